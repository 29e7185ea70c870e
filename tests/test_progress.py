"""The progress line: map-steps, maps done, rate and ETA; redrawn in place on a terminal, never
repeated in a log; closed once."""
from __future__ import annotations

import io

from engine.progress import ProgressBar, RunProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """Ten seconds pass between two readings."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


def test_a_log_gets_each_state_once_and_no_repeated_100_percent_line():
    out = io.StringIO()
    bar = ProgressBar("training cellot", out, every=0.0, clock=Clock())
    states = [RunProgress(0, 8, 0, 8000, "starting 2 worker(s)"), RunProgress(0, 8, 1000, 8000),
              RunProgress(4, 8, 4000, 8000), RunProgress(8, 8, 8000, 8000)]
    for state in states:
        for _ in range(16):  # the driver polls twice a second: the same state many times
            bar(state)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "training cellot: starting 2 worker(s) (0m10s)"
    assert lines[1].startswith("training cellot: maps 0/8 | 1000/8000 map-steps")
    assert "map-steps/s" in lines[2] and "eta" in lines[2]
    assert lines[3].startswith("training cellot: maps 8/8 | 8000/8000 map-steps") and "eta" not in lines[3]


def test_a_terminal_gets_one_line_redrawn_and_the_message_after_it():
    out = Terminal()
    bar = ProgressBar("training cellot", out, redraw=1e9, clock=Clock())
    bar(RunProgress(0, 4, 10, 400))
    bar(RunProgress(1, 4, 120, 400))
    bar.close("perturbot: interrupted")
    text = out.getvalue()
    assert text.count("\r") >= 2 and text.count("\n") == 2
    assert text.endswith("\nperturbot: interrupted\n")
    last = text.split("\r")[-1].split("\n")[0]
    assert last.startswith("training cellot: maps 1/4 | 120/400 map-steps | ") and "eta" in last
    bar.close("again")  # closing twice writes nothing more
    assert out.getvalue() == text
