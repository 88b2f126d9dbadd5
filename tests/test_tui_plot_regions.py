"""The loss chart's replot resends only the cells that changed (what an SSH user pays for)."""

from rich.text import Text
from textual.geometry import Region

from vgtui.tui.widgets import cell_changed_regions


def line(plain: str, *styled: tuple[int, int, str]) -> Text:
    text = Text(plain)
    for start, end, style in styled:
        text.stylize(style, start, end)
    return text


def test_unchanged_lines_send_nothing():
    before = [line("axis ⠁⠂ ", (5, 7, "red")), line("12 ⣀   ")]
    after = [line("axis ⠁⠂ ", (5, 7, "red")), line("12 ⣀   ")]
    assert cell_changed_regions(before, after, 8) == []


def test_a_moved_point_sends_only_its_columns():
    before = [line("1.0 ⠁    ", (4, 5, "red"))]
    after = [line("1.0  ⠁   ", (5, 6, "red"))]
    assert cell_changed_regions(before, after, 9) == [Region(4, 0, 2, 1)]


def test_a_recoloured_cell_counts_as_changed():
    before = [line("x ⠁⠁ y", (2, 3, "red"), (3, 4, "red"))]
    after = [line("x ⠁⠁ y", (2, 3, "red"), (3, 4, "blue"))]
    assert cell_changed_regions(before, after, 6) == [Region(3, 0, 1, 1)]


def test_added_or_resized_lines_are_sent_whole():
    before = [line("ab")]
    after = [line("ab"), line("cd")]
    assert cell_changed_regions(before, after, 2) == [Region(0, 1, 2, 1)]
    assert cell_changed_regions([line("abc")], [line("ab")], 3) == [Region(0, 0, 3, 1)]
