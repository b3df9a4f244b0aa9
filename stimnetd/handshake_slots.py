"""Who may do a TLS handshake now: bounded in all and per source address, the rest wait.

A handshake costs the front CPU and TLS state, and a peer that opens connections and
never finishes them holds that until the handshake timeout; so at most `max_in_all`
handshakes are unfinished at once, and `max_per_host` from one address (one noisy or
hostile host cannot take every slot). A connection over a limit is not closed at once:
200 clients of one notebook host connecting together are not an attack, and closing
them made most of them fail. It waits, first come first served, for a slot, holding only
its socket (the front reads nothing from it meanwhile), up to `max_waiting` of them;
`TlsFront` bounds how long each waits (`[tls] handshake_wait_s`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum


class Admission(Enum):
    NOW = "now"  # a slot is taken: handshake
    WAIT = "wait"  # queued: `on_turn` is called when a slot is taken for it
    FULL = "full"  # over the limits and the waiting room is full: refuse


class HandshakeSlots:
    def __init__(self, max_in_all: int, max_per_host: int, max_waiting: int) -> None:
        self.max_in_all = max_in_all
        self.max_per_host = max_per_host
        self.max_waiting = max_waiting
        self.handshaking = 0
        self.by_host: dict[str, int] = {}
        # Insertion-ordered: the oldest waiter whose host is under its limit goes next.
        self._waiting: dict[object, tuple[str, Callable[[], None]]] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, who: object, host: str, on_turn: Callable[[], None]) -> Admission:
        """Take a slot for `who` (a connection from `host`), queue it, or refuse it."""
        if self._free(host) and not self._waiting_from(host):
            self._take(host)
            return Admission.NOW
        if len(self._waiting) >= self.max_waiting:
            return Admission.FULL
        self._waiting[who] = (host, on_turn)
        return Admission.WAIT

    def withdraw(self, who: object) -> None:
        """`who` stops waiting (it closed, or waited too long); no-op if not waiting."""
        self._waiting.pop(who, None)

    def release(self, host: str) -> None:
        """A handshake from `host` ended (done, failed or timed out): its slot goes to the
        oldest waiter that may take it."""
        self.handshaking -= 1
        left = self.by_host.get(host, 1) - 1
        if left > 0:
            self.by_host[host] = left
        else:
            self.by_host.pop(host, None)
        for who, (waiter_host, on_turn) in list(self._waiting.items()):
            if self.handshaking >= self.max_in_all:
                break
            # `on_turn` may end a connection, and so release and admit, in turn.
            if who in self._waiting and self._free(waiter_host):
                del self._waiting[who]
                self._take(waiter_host)
                on_turn()

    def _free(self, host: str) -> bool:
        return self.handshaking < self.max_in_all and self.by_host.get(host, 0) < self.max_per_host

    def _waiting_from(self, host: str) -> bool:
        # A newcomer does not overtake its own host's waiters (it would starve them).
        return any(h == host for h, _ in self._waiting.values())

    def _take(self, host: str) -> None:
        self.handshaking += 1
        self.by_host[host] = self.by_host.get(host, 0) + 1
