"""Shared test set-up: deterministic, single-threaded torch (tests run beside each other on 2 cores)."""

import os

os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
