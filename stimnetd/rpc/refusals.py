"""How many refused calls from one source get an audit entry each.

A caller the node cannot authenticate (no certificate, another CA's, an expired or revoked
one) or one calling an RPC its role may not call is refused and audited, durably: the
audit log is how an operator learns of it. Unbounded, that is also a way for anyone who can
reach the port to fill the disk and to make the node fsync at the rate they choose. So per
source (the remote host for an unverified caller, the certificate's identity otherwise) the
first `burst` refusals of a window are audited one by one and the rest are counted; when the
window ends, one entry records how many there were, of which methods and reasons. All
sources together get at most GLOBAL_FACTOR × `burst` entries of their own per window (many
addresses, one attacker), and at most `max_sources` are counted apart. Every call is still
refused with its status; only the log is condensed, and nothing is dropped without being
counted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_BURST = 20
DEFAULT_WINDOW_S = 60.0
# Sources remembered at once: beyond it, further sources share one "overflow" slot, so a
# caller cycling through addresses cannot grow this table (or escape the limit).
MAX_SOURCES = 1024
GLOBAL_FACTOR = 50
OVERFLOW = "(other sources: too many to track one by one)"
# A summary names at most this many methods and reasons (the rest are counted as "other").
MAX_KINDS = 8


@dataclass
class _Window:
    started: float
    audited: int = 0
    suppressed: int = 0
    methods: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    role: str = ""


@dataclass(frozen=True)
class Summary:
    """Refusals of one source that were counted, not audited one by one."""

    source: str
    role: str
    count: int
    since: float
    until: float
    methods: dict[str, int]
    reasons: dict[str, int]

    def detail(self) -> dict[str, object]:
        return {"suppressed": self.count, "since": round(self.since, 3),
                "until": round(self.until, 3), "methods": self.methods,
                "reasons": self.reasons}


class RefusalLimiter:
    def __init__(self, *, burst: int = DEFAULT_BURST, window_s: float = DEFAULT_WINDOW_S,
                 max_sources: int = MAX_SOURCES,
                 clock: Callable[[], float] = time.time) -> None:
        if burst < 1 or window_s <= 0 or max_sources < 1:
            raise ValueError("burst and max_sources must be >= 1 and window_s > 0")
        self.burst = burst
        self.window_s = window_s
        self._max_sources = max_sources
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._global_started = clock()
        self._global_audited = 0

    def admit(self, source: str, role: str, method: str, reason: str) -> bool:
        """True: audit this refusal on its own. False: it was counted for a summary."""
        now = self._clock()
        w = self._windows.get(source)
        if w is None:
            if len(self._windows) >= self._max_sources:
                source, role = OVERFLOW, "mixed"
                w = self._windows.get(source)
            if w is None:
                w = self._windows[source] = _Window(started=now, role=role)
        if now - self._global_started >= self.window_s:
            self._global_started, self._global_audited = now, 0
        if w.audited < self.burst and self._global_audited < GLOBAL_FACTOR * self.burst:
            w.audited += 1
            self._global_audited += 1
            return True
        w.suppressed += 1
        _count(w.methods, method)
        _count(w.reasons, reason)
        return False

    def due(self, *, everything: bool = False) -> list[Summary]:
        """Summaries of the windows that have ended (all windows with `everything`, as at
        shutdown); those windows are forgotten, so a source starts afresh."""
        now = self._clock()
        out = []
        for source, w in list(self._windows.items()):
            if not everything and now - w.started < self.window_s:
                continue
            del self._windows[source]
            if w.suppressed:
                out.append(Summary(source, w.role, w.suppressed, w.started, now,
                                   dict(w.methods), dict(w.reasons)))
        return out


def _count(counter: Counter[str], key: str) -> None:
    key = key[:200]
    if key in counter or len(counter) < MAX_KINDS:
        counter[key] += 1
    else:
        counter["other"] += 1
