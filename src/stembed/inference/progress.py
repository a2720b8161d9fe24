"""The ``stembed embed`` progress bar: pixel-dates (S2 dates x pixels), reported by the tiles as they run.

Workers send ``(tile, pixel-dates)`` as dask events (:class:`Reporter`); the client's :class:`ProgressBar` counts
them, and each tile's rest when it finishes, so the bar moves within a tile and ends at the total.
"""

from __future__ import annotations

import threading
import time
from typing import Any

_REPORT_EVERY_S = 0.5  # how often a worker sends its tile's progress to the client


class Reporter:
    """Worker side of the progress bar: sends ``(tile, pixel-dates)`` to the client at most twice a second."""

    def __init__(self, topic: str, tile: tuple[int, int]) -> None:
        from distributed import get_worker

        self.worker, self.topic, self.tile = get_worker(), topic, [int(tile[0]), int(tile[1])]
        self.pending, self.last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        """Count ``n`` more pixel-dates; send what is pending if the last report is old enough."""
        self.pending += int(n)
        if time.monotonic() - self.last >= _REPORT_EVERY_S:
            self.worker.log_event(self.topic, [*self.tile, self.pending])
            self.pending, self.last = 0, time.monotonic()


class ProgressBar:
    """Client side: counts pixel-dates (S2 dates x pixels) as workers report them, and tiles as they finish.

    A tile's pixel-dates that were not embedded (no observed S2 centre) are counted when it finishes,
    so the bar ends at the total; reports that arrive after their tile finished are ignored.
    """

    def __init__(self, bar: Any, per_tile: dict[tuple[int, int], int], n_tiles: int, n_done: int) -> None:
        self.bar, self.per_tile, self.n_tiles, self.n_done = bar, per_tile, n_tiles, n_done
        self.reported: dict[tuple[int, int], int] = {}
        self.finished: set[tuple[int, int]] = set()
        self.lock = threading.Lock()
        self.bar.set_postfix_str(f"tiles {n_done}/{n_tiles}")

    def on_event(self, event: tuple[float, Any]) -> None:
        """A worker's report ``(time, (iy, ix, pixel-dates))``, capped at what its tile has left."""
        _, (iy, ix, n) = event
        tile = (int(iy), int(ix))
        with self.lock:
            if tile in self.finished or tile not in self.per_tile:
                return
            add = max(0, min(int(n), self.per_tile[tile] - self.reported.get(tile, 0)))
            self.reported[tile] = self.reported.get(tile, 0) + add
            self.bar.update(add)

    def finish(self, tile: tuple[int, int]) -> None:
        """``tile`` is written: count its pixel-dates not reported yet."""
        with self.lock:
            self.finished.add(tile)
            self.bar.update(self.per_tile[tile] - self.reported.get(tile, 0))
            self.n_done += 1
            self.bar.set_postfix_str(f"tiles {self.n_done}/{self.n_tiles}")
