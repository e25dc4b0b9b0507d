"""Wall-clock and CPU timing of named stages, printed as one table at the end of a run.

CPU seconds are this process's (all threads); on a machine shared with other work they show what a stage
costs when the wall clock does not.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageTimer:
    """``with timer.stage("score"): ...`` records the seconds each named stage took (repeats add up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = (
                self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start
            )

    @property
    def total(self) -> float:
        return time.perf_counter() - self._started

    @property
    def cpu_total(self) -> float:
        return time.process_time() - self._cpu_started

    def table(self) -> str:
        width = max([len(name) for name in self.seconds] + [len("total")])
        lines = [f"{'stage':<{width}}  {'wall':>8}  {'cpu':>8}"]
        lines += [
            f"{n:<{width}}  {s:7.1f}s  {self.cpu_seconds[n]:7.1f}s" for n, s in self.seconds.items()
        ]
        lines.append(f"{'total':<{width}}  {self.total:7.1f}s  {self.cpu_total:7.1f}s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {
            "wall_seconds": {
                **{k: round(v, 2) for k, v in self.seconds.items()},
                "total": round(self.total, 2),
            },
            "cpu_seconds": {
                **{k: round(v, 2) for k, v in self.cpu_seconds.items()},
                "total": round(self.cpu_total, 2),
            },
        }
