"""Counters of the net device (frames, bytes, drops by reason) and their periodic log line.

Each queue pair's counters are written by the one worker thread that serves the pair; readers in
other threads (the periodic logger, tests) see values at most one frame old.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Complaints", "NetStats", "PairStats", "StatsLogger"]

log = logging.getLogger("pyvhost.devices.net")

COMPLAINTS_LOGGED = 5
"""Guest mistakes of one reason logged one by one before they are only counted."""


@dataclass
class PairStats:
    """One queue pair: what went through it and what was dropped, by reason."""

    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] += n


@dataclass
class NetStats:
    """The device's counters: one :class:`PairStats` per pair plus the control queue's."""

    pairs: list[PairStats]
    ctrl_ok: int = 0
    ctrl_err: int = 0
    announced: int = 0

    @classmethod
    def for_pairs(cls, n: int) -> NetStats:
        return cls([PairStats() for _ in range(n)])

    def totals(self) -> PairStats:
        total = PairStats()
        for p in self.pairs:
            total.tx_frames += p.tx_frames
            total.tx_bytes += p.tx_bytes
            total.rx_frames += p.rx_frames
            total.rx_bytes += p.rx_bytes
            total.drops.update(p.drops)
        return total

    def as_dict(self) -> dict[str, object]:
        """Totals, drops by reason and per pair, for JSON and tests."""
        total = self.totals()
        return {
            "tx_frames": total.tx_frames,
            "tx_bytes": total.tx_bytes,
            "rx_frames": total.rx_frames,
            "rx_bytes": total.rx_bytes,
            "drops": dict(total.drops),
            "ctrl_ok": self.ctrl_ok,
            "ctrl_err": self.ctrl_err,
            "announced": self.announced,
            "pairs": [
                {"tx_frames": p.tx_frames, "rx_frames": p.rx_frames, "drops": dict(p.drops)}
                for p in self.pairs
            ],
        }

    def line(self) -> str:
        """One log line: totals, drops by reason, and per-pair frames when there are several."""
        t = self.totals()
        text = (
            f"tx {t.tx_frames} frames {t.tx_bytes} bytes, rx {t.rx_frames} frames "
            f"{t.rx_bytes} bytes, drops {sum(t.drops.values())}"
        )
        if t.drops:
            text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(t.drops.items())) + ")"
        if len(self.pairs) > 1:
            text += "; pairs " + " ".join(
                f"[{i}] tx {p.tx_frames} rx {p.rx_frames}" for i, p in enumerate(self.pairs)
            )
        if self.ctrl_ok or self.ctrl_err:
            text += f"; control commands ok {self.ctrl_ok} err {self.ctrl_err}"
        return text


class Complaints:
    """Logs what a guest got wrong with the reason, the first few of each kind one by one, then
    only counts them (a hostile guest must not flood the log)."""

    def __init__(self, limit: int = COMPLAINTS_LOGGED) -> None:
        self.limit = limit
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> None:
        with self._lock:
            self.seen[kind] += 1
            n = self.seen[kind]
        if n <= self.limit:
            suffix = "; further ones are counted, not logged" if n == self.limit else ""
            log.warning("%s%s", message, suffix)


class StatsLogger:
    """Logs ``stats.line()`` every ``interval`` seconds from a daemon thread until :meth:`stop`,
    which logs it once more."""

    def __init__(self, stats: NetStats, interval: float, name: str = "net") -> None:
        self.stats = stats
        self.interval = interval
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-stats", daemon=True)

    def start(self) -> StatsLogger:
        if self.interval > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            log.info("%s: %s", self.name, self.stats.line())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        log.info("%s at exit: %s", self.name, self.stats.line())
