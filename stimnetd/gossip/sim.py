"""An in-memory network of `Swim` nodes under virtual time, with fault injection.

Virtual time: `VirtualTimeLoop` is an ordinary asyncio loop whose clock jumps straight to
the next timer whenever nothing is runnable, so a minute of gossip between 128 nodes
runs in seconds and identically on every run (all randomness is seeded). Everything
awaits `asyncio.sleep`/`asyncio.timeout`, so `Swim` runs unchanged.

Used by the unit tests and `bench/gossip.py`; shipped so daemon-level tests can reuse it.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.membership import GossipError, InMemoryMemberStore, Member
from stimnetd.gossip.swim import Swim
from stimnetd.gossip.transport import FullState, PeerUnreachable, ProbeMessage

T = TypeVar("T")

# 2026-01-01T00:00:00Z, so wall-clock fields look like real timestamps.
SIM_EPOCH = 1_767_225_600.0


class SimulationDeadlock(RuntimeError):
    """Nothing is runnable and no timer is pending: the simulation would never end."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise SimulationDeadlock("no task is runnable and no timer is pending")
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)


class SimClock:
    """Reads the running loop's clock, which is virtual under `VirtualTimeLoop`."""

    def time(self) -> float:
        return SIM_EPOCH + asyncio.get_running_loop().time()

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# ---- message size ------------------------------------------------------------------------
# Protobuf's encoded size under protos/stimnet/v1/federation.proto (MemberState inside
# GossipMessage), so bench figures predict the real wire.


def _varint(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _text(s: str) -> int:
    n = len(s.encode())
    return 1 + _varint(n) + n


def _embedded(body: int) -> int:
    return 1 + _varint(body) + body


def member_size(m: Member) -> int:
    body = _text(m.name) + _text(m.address) + 1 + _varint(m.incarnation) + _text(m.status)
    body += 9  # last_heard, a double
    body += sum(_embedded(_text(name) + 1 + _varint(version)) for name, version in m.catalogs)
    return _embedded(body)


class MessageSizer:
    """`message_size` with a cache: the same entries are resent every round, and sizing
    them afresh dominated the 128-node bench."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str, int, tuple[tuple[str, int], ...]], int] = {}

    def member(self, m: Member) -> int:
        key = (m.name, m.address, m.incarnation, m.catalogs)
        size = self._cache.get(key)
        if size is None:
            size = self._cache[key] = member_size(m)
        return size

    def message(self, msg: ProbeMessage | FullState | bool) -> int:
        if isinstance(msg, bool):
            return 2
        entries = msg.updates if isinstance(msg, ProbeMessage) else msg.members
        return self.member(msg.source) + sum(map(self.member, entries))


def message_size(msg: ProbeMessage | FullState | bool) -> int:
    return MessageSizer().message(msg)


# ---- network -----------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes and messages sent, by path ("probe" or "push_pull")."""

    bytes: dict[str, int]
    messages: dict[str, int]
    largest: dict[str, int]

    @classmethod
    def empty(cls) -> Traffic:
        return cls(defaultdict(int), defaultdict(int), defaultdict(int))


class SimNetwork:
    """Delivers calls between registered nodes; a lost request or reply surfaces to the
    caller as a timeout, as it would over TCP when a host or link goes dark."""

    def __init__(self, rng: random.Random, *, latency: float = 0.001,
                 drop_rate: float = 0.0) -> None:
        self._rng = rng
        self.latency = latency
        self.drop_rate = drop_rate
        self._nodes: dict[str, Swim] = {}
        self._up: set[str] = set()
        self._groups: list[frozenset[str]] = []
        self.traffic = Traffic.empty()
        self._sizer = MessageSizer()

    def register(self, address: str, node: Swim) -> None:
        self._nodes[address] = node
        self._up.add(node.name)

    def unregister(self, address: str) -> None:
        node = self._nodes.pop(address, None)
        if node is not None:
            self._up.discard(node.name)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split by node name; nodes in no group share one implicit group."""
        self._groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        self._groups = []

    def reset_traffic(self) -> None:
        self.traffic = Traffic.empty()

    def _side(self, name: str) -> int:
        for i, group in enumerate(self._groups):
            if name in group:
                return i
        return -1

    def _connected(self, a: str, b: str) -> bool:
        return self._side(a) == self._side(b)

    def _is_up(self, name: str) -> bool:
        return name in self._up

    def _count(self, path: str, size: int) -> None:
        self.traffic.bytes[path] += size
        self.traffic.messages[path] += 1
        self.traffic.largest[path] = max(self.traffic.largest[path], size)

    def _leg_lost(self, src: str, dst: str) -> bool:
        return (not self._is_up(src) or not self._is_up(dst) or not self._connected(src, dst)
                or (self.drop_rate > 0 and self._rng.random() < self.drop_rate))

    async def call(self, src: str, address: str, path: str, request: Any,
                   invoke: Callable[[Swim], Awaitable[T]], timeout: float) -> T:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                self._count(path, self._sizer.message(request))
                await asyncio.sleep(self.latency)
                node = self._nodes.get(address)
                if node is None or self._leg_lost(src, node.name):
                    await asyncio.Event().wait()
                assert node is not None
                try:
                    reply = await invoke(node)
                except GossipError as exc:
                    raise PeerUnreachable(f"{address} refused: {exc.reason}") from exc
                self._count(path, self._sizer.message(reply))  # type: ignore[arg-type]
                await asyncio.sleep(self.latency)
                if self._leg_lost(node.name, src):
                    await asyncio.Event().wait()
                return reply
        except TimeoutError:
            raise PeerUnreachable(f"{address} did not answer within {timeout}s") from None


class SimTransport:
    """`Transport` for one node of a `SimNetwork`; passes the sender's name as the
    authenticated identity, as the mTLS layer would."""

    def __init__(self, network: SimNetwork, name: str) -> None:
        self._network = network
        self._name = name

    # ASYNC109 waived: `Transport` takes the deadline as an argument (see its docstring).
    async def ping(
        self, address: str, msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> ProbeMessage:
        return await self._network.call(
            self._name, address, "probe", msg, lambda n: n.handle_ping(self._name, msg), timeout)

    async def ping_req(
        self, via_address: str, target_name: str, target_address: str,
        msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> bool:
        return await self._network.call(
            self._name, via_address, "probe", msg,
            lambda n: n.handle_ping_req(self._name, target_name, target_address, msg), timeout)

    async def push_pull(
        self, address: str, state: FullState, timeout: float,  # noqa: ASYNC109
    ) -> FullState:
        return await self._network.call(
            self._name, address, "push_pull", state,
            lambda n: n.handle_push_pull(self._name, state), timeout)


def _silent_logger() -> Any:
    return structlog.wrap_logger(structlog.ReturnLogger(), processors=[])


class SimCluster:
    """N nodes named node-000…, all seeded with node-000's address, each with its own
    persistent in-memory store so that `restart` behaves like a daemon restart."""

    def __init__(self, n: int, *, config: GossipConfig | None = None, seed: int = 0,
                 latency: float = 0.001, drop_rate: float = 0.0,
                 catalogs: Callable[[int], tuple[tuple[str, int], ...]] | None = None) -> None:
        self.config = config or GossipConfig()
        self._rng = random.Random(seed)
        self.network = SimNetwork(random.Random(self._rng.random()), latency=latency,
                                  drop_rate=drop_rate)
        self.names = [f"node-{i:03d}" for i in range(n)]
        self._catalogs = catalogs or (lambda _i: ())
        self.stores = {name: InMemoryMemberStore() for name in self.names}
        self.nodes: dict[str, Swim] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.clock = SimClock()

    @staticmethod
    def address(name: str) -> str:
        return f"sim://{name}"

    @property
    def running(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    def _build(self, name: str) -> Swim:
        index = self.names.index(name)
        me = Member(name, self.address(name), 0, "alive", self.clock.time(),
                    self._catalogs(index))
        return Swim(me, [self.address(self.names[0])], SimTransport(self.network, name),
                    store=self.stores[name], clock=self.clock,
                    rng=random.Random(self._rng.random()), config=self.config,
                    log=_silent_logger())

    def start(self, names: Iterable[str] | None = None) -> None:
        for name in self.names if names is None else names:
            node = self._build(name)
            self.nodes[name] = node
            self.network.register(self.address(name), node)
            self._tasks[name] = asyncio.create_task(node.run(), name=f"swim-{name}")

    async def kill(self, name: str) -> None:
        """Crash: no goodbye, no final save; peers just stop hearing from it."""
        self.network.unregister(self.address(name))
        task = self._tasks[name]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def restart(self, name: str) -> None:
        self.start([name])

    async def leave(self, name: str) -> None:
        await self.nodes[name].leave()
        await self.stop_node(name)

    async def stop_node(self, name: str) -> None:
        self.network.unregister(self.address(name))
        await self.nodes[name].shutdown()
        await self._tasks[name]

    async def stop(self) -> None:
        for name in self.running:
            await self.nodes[name].shutdown()
        results = await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                raise result

    async def __aenter__(self) -> SimCluster:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def status(self, observer: str, name: str) -> str | None:
        m = self.nodes[observer].get(name)
        return m.status if m is not None else None

    def all_see(self, names: Iterable[str], statuses: tuple[str, ...],
                observers: Iterable[str] | None = None) -> bool:
        """Every running observer (or those given) sees every one of `names` in one of
        `statuses` (an observer is not asked about itself)."""
        targets = list(names)
        return all(self.status(o, t) in statuses
                   for o in (self.running if observers is None else observers)
                   for t in targets if t != o)

    def converged(self) -> bool:
        return self.all_see(self.running, ("alive",))

    async def wait_until(self, condition: Callable[[], bool], within: float,
                         step: float | None = None) -> float | None:
        """Virtual seconds until `condition` holds, polled every `step`; None if it does
        not hold within `within` seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = step or self.config.gossip_interval / 4
        while True:
            if condition():
                return loop.time() - start
            if loop.time() - start >= within:
                return None
            await asyncio.sleep(step)
