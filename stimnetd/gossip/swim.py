"""SWIM failure detection and push-pull anti-entropy over an abstract `Transport`.

The gRPC adapter implements `Transport` for outbound calls and calls `Swim.handle_*`
from its servicer with the name taken from the peer certificate. Everything here is
transport-agnostic so the same code runs in `sim.py` under virtual time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import replace

import structlog

from stimnetd.gossip.broadcast import BroadcastQueue
from stimnetd.gossip.clock import Clock
from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.membership import (
    ForgedSender,
    GossipError,
    InvalidGossip,
    Member,
    MemberChange,
    MemberStore,
    PeerTable,
    precedence,
    same_claim,
    validate_member,
    validate_members,
)
from stimnetd.gossip.transport import FullState, PeerUnreachable, ProbeMessage, Transport

MemberListener = Callable[[MemberChange], None]


class Swim:
    """One node's membership: probes peers, spreads updates, answers peers' calls."""

    def __init__(
        self,
        self_member: Member,
        seeds: list[str],
        transport: Transport,
        *,
        store: MemberStore,
        clock: Clock,
        rng: random.Random,
        config: GossipConfig | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.config = config or GossipConfig()
        validate_member(self_member, self.config.limits, None)
        self._self = replace(self_member, status="alive")
        self._seeds = [s for s in seeds if s != self_member.address]
        self._transport = transport
        self._store = store
        self._clock = clock
        self._rng = rng
        self._log = log or structlog.get_logger("stimnetd.gossip").bind(node=self_member.name)
        self._table = PeerTable(self_member.name, self.config.limits.max_members)
        self._broadcasts = BroadcastQueue()
        self._suspicions: dict[str, tuple[int, float]] = {}
        self._listeners: list[MemberListener] = []
        self._probe_order: list[str] = []
        self._in_flight: set[str] = set()
        self._exchanges: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._started = False
        self._dirty = False
        self._next_persist = 0.0
        self._next_join = 0.0
        self._join_backoff = self.config.gossip_interval
        self._next_reconnect = 0.0
        self._tasks: asyncio.TaskGroup | None = None

    # ---- public query API -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._self.name

    def local_member(self) -> Member:
        return replace(self._self, last_heard=self._clock.time())

    def members(self) -> list[Member]:
        """Every known member including this node, dead and left ones too, by name."""
        return sorted([self.local_member(), *self._table.members()], key=lambda m: m.name)

    def get(self, name: str) -> Member | None:
        return self.local_member() if name == self.name else self._table.get(name)

    def alive_with_catalog(self, catalog: str, *, include_suspect: bool = False) -> list[Member]:
        wanted = ("alive", "suspect") if include_suspect else ("alive",)
        return [m for m in self.members() if m.status in wanted and m.has_catalog(catalog)]

    def subscribe(self, listener: MemberListener) -> Callable[[], None]:
        """Call `listener` on every accepted change about another member (joins, status,
        catalog changes); returns a function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def set_catalogs(self, catalogs: tuple[tuple[str, int], ...]) -> None:
        """Publish a new catalog list; the incarnation bump makes it win everywhere."""
        self._bump_self(self._self.incarnation + 1, catalogs=catalogs)

    # ---- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        if self._started:
            raise RuntimeError("Swim.run() may be called once")
        self._started = True
        await self._restore()
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            probe = tg.create_task(self._probe_loop())
            gossip = tg.create_task(self._gossip_loop())
            await self._stop.wait()
            for task in (probe, gossip, *self._exchanges):
                task.cancel()
        self._tasks = None
        await self._persist()

    async def shutdown(self) -> None:
        self._stop.set()

    async def leave(self) -> None:
        """Announce a graceful departure: `left` at a higher incarnation, pushed directly
        to a few peers so it does not depend on this node living another round."""
        if self._self.status == "left":
            return
        self._self = replace(self._self, incarnation=self._self.incarnation + 1, status="left")
        self._broadcasts.enqueue(self._self)
        self._dirty = True
        peers = self._live_peers()
        targets = self._rng.sample(peers, min(self.config.fanout, len(peers)))
        state = self._full_state()
        await asyncio.gather(*(self._push_leave(m.address, state) for m in targets))
        await self._persist()

    async def _push_leave(self, address: str, state: FullState) -> None:
        try:
            await self._transport.push_pull(address, state, self.config.push_pull_timeout)
        except (PeerUnreachable, GossipError):
            pass  # the others learn it by gossip from the peers that did answer

    # ---- inbound (called by the servicer with the authenticated peer name) -------------

    async def handle_ping(self, sender: str, msg: ProbeMessage) -> ProbeMessage:
        self._receive_probe(sender, msg)
        return self._probe_message(about=sender)

    async def handle_ping_req(
        self, sender: str, target_name: str, target_address: str, msg: ProbeMessage
    ) -> bool:
        """Probe `target` on the sender's behalf; True if it acked in time."""
        limits = self.config.limits
        if not isinstance(target_name, str) or not 0 < len(target_name) <= limits.max_name_len:
            raise InvalidGossip("target name missing or too long")
        if not isinstance(target_address, str) or len(target_address) > limits.max_address_len:
            raise InvalidGossip("target address too long")
        self._receive_probe(sender, msg)
        if target_name == self.name:
            return True
        # Only a member we know, at the address we know it by: a PingReq must not aim this
        # node's connections at any address a caller names (each one would also stay
        # cached as a channel). An unknown member is simply not acked by us.
        known = self._table.get(target_name)
        if known is None:
            return False
        return await self._ping(target_name, known.address, self._probe_message(about=target_name))

    async def handle_push_pull(self, sender: str, state: FullState) -> FullState:
        self._receive_state(sender, state)
        theirs = {m.name: m for m in state.members}
        theirs[state.source.name] = state.source
        delta = []
        for mine in self._table.members():  # our own entry always travels as `source`
            known = theirs.get(mine.name)
            if known is None or precedence(mine) > precedence(known):
                delta.append(mine)
        return FullState(source=self.local_member(), members=tuple(delta))

    # ---- merging ----------------------------------------------------------------------

    def _receive_probe(self, sender: str, msg: ProbeMessage) -> None:
        self._check_source(sender, msg.source)
        validate_members(msg.updates, self.config.limits, self._known)
        now = self._clock.time()
        self._accept(msg.source, now, direct=True)
        for m in msg.updates:
            self._accept(m, now)

    def _receive_state(self, sender: str, state: FullState) -> None:
        self._check_source(sender, state.source)
        validate_members(state.members, self.config.limits, self._known)
        now = self._clock.time()
        self._accept(state.source, now, direct=True)
        for m in state.members:
            if m.name != sender:  # the sender's own word about itself is `source`
                self._accept(m, now)

    def _check_source(self, sender: str, source: Member) -> None:
        if not isinstance(source, Member) or source.name != sender:
            raise ForgedSender(f"message signed by {sender!r} claims another sender")
        if sender == self.name:
            raise InvalidGossip("message claims to come from this node")
        validate_member(source, self.config.limits, self._known(sender))
        if source.status not in ("alive", "left"):
            raise InvalidGossip("a node can only claim to be alive or to have left")

    def _known(self, name: str) -> Member | None:
        return self._self if name == self.name else self._table.get(name)

    def _accept(self, claim: Member, now: float, *, direct: bool = False) -> None:
        if claim.name == self.name:
            self._consider_claim_about_self(claim)
            return
        change = self._table.apply(claim, now)
        if change is None:
            if direct:
                self._table.touch(claim.name, now)
            return
        self._on_change(change)

    def _consider_claim_about_self(self, claim: Member) -> None:
        if self._self.status == "left" or same_claim(claim, self._self):
            return
        if precedence(claim) >= precedence(self._self):
            # Someone suspects us, declared us dead, or holds a stale or foreign entry that
            # would win: out-bid it. Only this node ever raises its own incarnation.
            self._bump_self(claim.incarnation + 1)

    def _bump_self(self, incarnation: int, **changes: object) -> None:
        self._self = replace(self._self, incarnation=incarnation, status="alive", **changes)  # type: ignore[arg-type]
        self._broadcasts.enqueue(self._self)
        self._dirty = True

    def _on_change(self, change: MemberChange) -> None:
        current = change.current
        self._broadcasts.enqueue(current)
        self._dirty = True
        if current.status == "suspect":
            if self._suspicions.get(current.name, (None,))[0] != current.incarnation:
                deadline = self._clock.monotonic() + self.config.suspicion_timeout(
                    self._cluster_size())
                self._suspicions[current.name] = (current.incarnation, deadline)
        else:
            self._suspicions.pop(current.name, None)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                # A broken metrics hook must not stop failure detection.
                self._log.exception("member listener failed", member=current.name)

    def _declare(self, name: str, incarnation: int, status: str) -> None:
        current = self._table.get(name)
        if current is None or current.incarnation != incarnation:
            return
        change = self._table.apply(replace(current, status=status), self._clock.time())  # type: ignore[arg-type]
        if change is not None:
            self._on_change(change)

    def _expire_suspicions(self) -> None:
        now = self._clock.monotonic()
        for name, (incarnation, deadline) in list(self._suspicions.items()):
            if now >= deadline:
                del self._suspicions[name]
                current = self._table.get(name)
                if current is not None and current.status == "suspect":
                    self._declare(name, incarnation, "dead")

    # ---- messages we send -------------------------------------------------------------

    def _cluster_size(self) -> int:
        return 1 + sum(1 for m in self._table.members() if m.status in ("alive", "suspect"))

    def _probe_message(self, about: str | None = None) -> ProbeMessage:
        """Our entry plus piggybacked updates; if we disagree with `about`'s view of
        itself (we suspect it), our record goes first so it can refute at once."""
        count = self.config.max_piggyback
        updates: list[Member] = []
        record = self._table.get(about) if about is not None else None
        if record is not None and record.status != "alive":
            updates.append(record)
            count -= 1
        limit = self.config.retransmit_limit(self._cluster_size())
        updates += self._broadcasts.take(count, limit, exclude=about if updates else None)
        return ProbeMessage(source=self.local_member(), updates=tuple(updates))

    def _full_state(self) -> FullState:
        return FullState(source=self.local_member(), members=tuple(self._table.members()))

    def _live_peers(self) -> list[Member]:
        return [m for m in self._table.members() if m.status in ("alive", "suspect")]

    # ---- failure detection ------------------------------------------------------------

    async def _probe_loop(self) -> None:
        while True:
            started = self._clock.monotonic()
            if self._self.status != "left":
                await self._probe_next()
            elapsed = self._clock.monotonic() - started
            await self._clock.sleep(max(0.0, self.config.probe_interval - elapsed))

    def _next_probe_target(self) -> Member | None:
        # Round-robin over a shuffled list bounds the time to first probe of any member
        # (random choice alone has an unbounded tail).
        for _ in range(2):
            while self._probe_order:
                m = self._table.get(self._probe_order.pop())
                if m is not None and m.status in ("alive", "suspect"):
                    return m
            self._probe_order = [m.name for m in self._live_peers()]
            self._rng.shuffle(self._probe_order)
        return None

    async def _probe_next(self) -> None:
        target = self._next_probe_target()
        if target is None:
            return
        if await self._ping(target.name, target.address, self._probe_message(about=target.name)):
            return
        others = [m for m in self._live_peers() if m.name != target.name]
        relays = self._rng.sample(others, min(self.config.indirect_checks, len(others)))
        window = self.config.probe_interval - self.config.probe_timeout
        msg = self._probe_message()
        acks = await asyncio.gather(*(self._ping_req(r, target, msg, window) for r in relays))
        if any(acks):
            self._table.touch(target.name, self._clock.time())
            return
        if target.status == "alive":
            self._declare(target.name, target.incarnation, "suspect")

    async def _ping(self, name: str, address: str, msg: ProbeMessage) -> bool:
        try:
            ack = await self._transport.ping(address, msg, self.config.probe_timeout)
            if ack.source.name != name:
                return False  # the address now belongs to someone else
            self._receive_probe(name, ack)
            return True
        except PeerUnreachable:
            return False
        except GossipError as exc:
            self._log.warning("refused ack", peer=name, reason=exc.reason)
            return False

    async def _ping_req(self, relay: Member, target: Member, msg: ProbeMessage,
                        window: float) -> bool:
        try:
            return await self._transport.ping_req(
                relay.address, target.name, target.address, msg, window)
        except PeerUnreachable:
            return False

    # ---- anti-entropy and joining -----------------------------------------------------

    async def _gossip_loop(self) -> None:
        while True:
            self._expire_suspicions()
            if self._self.status != "left":
                self._gossip_round()
            if self._dirty and self._clock.monotonic() >= self._next_persist:
                await self._persist()
            await self._clock.sleep(self.config.gossip_interval)

    def _gossip_round(self) -> None:
        now = self._clock.monotonic()
        peers = self._live_peers()
        if peers:
            self._join_backoff = self.config.gossip_interval
            for m in self._rng.sample(peers, min(self.config.fanout, len(peers))):
                self._start_exchange(m.address)
            if now >= self._next_reconnect:
                self._next_reconnect = now + self.config.reconnect_interval
                dead = [m for m in self._table.members() if m.status == "dead"]
                if dead:
                    self._start_exchange(self._rng.choice(dead).address)
        elif now >= self._next_join:
            # Seeds plus whatever we restored: any one answering is enough to join.
            candidates = set(self._seeds)
            candidates.update(m.address for m in self._table.members() if m.status != "left")
            for address in sorted(candidates):
                self._start_exchange(address)
            self._next_join = now + self._join_backoff
            self._join_backoff = min(2 * self._join_backoff, self.config.join_backoff_max)

    def _start_exchange(self, address: str) -> None:
        if address in self._in_flight or self._tasks is None:
            return
        self._in_flight.add(address)
        task = self._tasks.create_task(self._exchange(address))
        self._exchanges.add(task)
        task.add_done_callback(self._exchanges.discard)

    async def _exchange(self, address: str) -> None:
        try:
            reply = await self._transport.push_pull(
                address, self._full_state(), self.config.push_pull_timeout)
            self._receive_state(reply.source.name, reply)
        except PeerUnreachable:
            pass
        except GossipError as exc:
            self._log.warning("refused push-pull reply", address=address, reason=exc.reason)
        finally:
            self._in_flight.discard(address)

    # ---- persistence ------------------------------------------------------------------

    async def _restore(self) -> None:
        stored = await self._store.load()
        for m in stored:
            if m.name == self.name and m.incarnation >= self._self.incarnation:
                # Come back above anything we may have said before the restart.
                self._self = replace(self._self, incarnation=m.incarnation + 1, status="alive")
        self._table.restore(stored)
        now = self._clock.monotonic()
        for m in self._table.members():
            if m.status == "suspect":
                deadline = now + self.config.suspicion_timeout(self._cluster_size())
                self._suspicions[m.name] = (m.incarnation, deadline)
        self._broadcasts.enqueue(self._self)
        await self._persist()

    async def _persist(self) -> None:
        self._dirty = False
        self._next_persist = self._clock.monotonic() + self.config.persist_interval
        await self._store.save([self.local_member(), *self._table.members()])
