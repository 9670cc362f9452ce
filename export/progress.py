"""Progress with an ETA for every phase of training that can take more than a few seconds.

On a terminal it is a tqdm bar; otherwise (a log file, CI, a pipe) one line per tenth of the work,
so a log shows how far a long run got and when it expects to finish.
"""
from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

LINES_PER_PHASE = 10


class Progress:
    """`total` units of work (rows, bytes, steps), advanced as they are done."""

    def __init__(self, what: str, total: int, unit: str, stream: IO[str] | None = None):
        self.what, self.total, self.unit = what, max(int(total), 1), unit
        self.stream = stream or sys.stdout
        self.done, self.started, self.next_line = 0, time.perf_counter(), 1
        self.bar = (tqdm(total=self.total, desc=what, unit=unit, unit_scale=True, file=self.stream, leave=False)
                    if self.stream.isatty() else None)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        while self.next_line < LINES_PER_PHASE and self.done * LINES_PER_PHASE >= self.next_line * self.total:
            self._line()
            self.next_line += 1

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        share = min(self.done / self.total, 1.0)
        eta = elapsed * (1 - share) / share if share else float("nan")
        print(f"  {self.what}: {share:.0%} of {self.total:,} {self.unit}, {elapsed:.0f}s, eta {eta:.0f}s",
              file=self.stream, flush=True)

    def close(self) -> float:
        """Ends the bar; returns the phase's seconds."""
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.started
