"""Diagnosis (being written)."""
from .records import RunHeader, StepRecord, Verdict


class Diagnoser:
    def __init__(self, header: RunHeader):
        self.header = header

    def update(self, record: StepRecord) -> list[Verdict]:
        return []
