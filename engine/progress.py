"""Progress of a training run: what the driver knows (RunProgress) and one live line on stderr.

A run's work is counted in map-steps: a stack of K maps trained for S steps is K x S map-steps, so
the total is the same however the maps are stacked, and the rate (map-steps/s) is what a device
delivers. Maps are done when trained, diverged or failed.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO


RATE_AFTER_S = 3.0  # the rate and ETA show once steps have moved for this long


@dataclass(frozen=True)
class RunProgress:
    maps_done: int
    maps: int
    map_steps: int
    map_steps_total: int
    waiting: str = ""  # why nothing runs yet, e.g. "waiting for 4 CPUs (the cluster has 2)"


ProgressFn = Callable[[RunProgress], None]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressBar:
    """One line: `label: maps 3/8 | 2400/8000 map-steps | 512 map-steps/s | eta 0m11s`.

    On a terminal it redraws in place (at most `redraw` times a second); into a file or pipe it
    writes a line every `every` seconds when something changed. `close()` ends the line once,
    with the last state and an optional message (e.g. how the run ended).
    """

    def __init__(self, label: str, stream: TextIO | None = None, redraw: float = 4.0, every: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.label, self.clock = label, clock
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = 1.0 / redraw if self.live else every
        self.started = clock()
        self.base: tuple[float, int] | None = None  # (time, map-steps) of the first update: the rate's origin
        self.last: RunProgress | None = None
        self.shown: str = ""
        self.shown_state: RunProgress | None = None
        self.drawn_at = float("-inf")
        self.closed = False

    def line(self, p: RunProgress, now: float) -> str:
        if p.waiting and p.map_steps == 0:
            return f"{self.label}: {p.waiting} ({_duration(now - self.started)})"
        text = f"{self.label}: maps {p.maps_done}/{p.maps} | {p.map_steps}/{p.map_steps_total} map-steps"
        assert self.base is not None
        elapsed, steps = now - self.base[0], p.map_steps - self.base[1]
        if elapsed >= RATE_AFTER_S and steps > 0:
            rate = steps / elapsed
            text += f" | {rate:.0f} map-steps/s"
            if p.map_steps < p.map_steps_total:
                text += f" | eta {_duration((p.map_steps_total - p.map_steps) / rate)}"
        return text + f" | {_duration(now - self.started)}"

    def __call__(self, p: RunProgress) -> None:
        now = self.clock()
        if self.base is None or p.map_steps <= self.base[1]:  # the rate starts when steps do
            self.base = (now, p.map_steps)
        self.last = p
        if self.closed or now - self.drawn_at < self.interval:
            return
        if not self.live and p == self.shown_state:
            return  # nothing moved: no repeated lines in a log
        self._write(self.line(p, now), now)
        self.shown_state = p

    def _write(self, text: str, now: float) -> None:
        if self.live:
            pad = max(0, len(self.shown) - len(text))
            self.stream.write("\r" + text + " " * pad)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown, self.drawn_at = text, now

    def close(self, message: str = "") -> None:
        """End the bar: the last state (in a log: unless already written), then `message` on its own line."""
        if self.closed:
            return
        self.closed = True
        if self.last is not None:
            if self.live or self.last != self.shown_state:
                now = self.clock()
                self._write(self.line(self.last, now), now)
            if self.live:
                self.stream.write("\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
