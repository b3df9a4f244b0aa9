"""SWIM behaviour: inbound handling, refutation, piggybacking, and whole-cluster runs in
the virtual-time simulator."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable

import pytest

from stimnet.errors import InvalidRequest, StimnetError
from stimnetd.gossip.membership import (
    ForgedSender,
    InMemoryMemberStore,
    InvalidGossip,
    Member,
    MemberChange,
    MemberLimits,
)
from stimnetd.gossip.sim import SimClock, SimCluster, member_size, run_virtual
from stimnetd.gossip.swim import (
    BroadcastQueue,
    Clock,
    FullState,
    GossipConfig,
    PeerUnreachable,
    ProbeMessage,
    Swim,
)

EPOCH = 1_767_225_600.0


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


class ScriptedTransport:
    """Answers pings from a table of address -> reply function; anything else is unreachable."""

    def __init__(self) -> None:
        self.pings: dict[str, Callable[[ProbeMessage], ProbeMessage]] = {}
        self.sent: list[tuple[str, str]] = []

    # ASYNC109 waived: `Transport` takes the deadline as an argument (see its docstring).
    async def ping(
        self, address: str, msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> ProbeMessage:
        self.sent.append(("ping", address))
        if address not in self.pings:
            raise PeerUnreachable(address)
        return self.pings[address](msg)

    async def ping_req(
        self, via_address: str, target_name: str, target_address: str,
        msg: ProbeMessage, timeout: float,  # noqa: ASYNC109
    ) -> bool:
        self.sent.append(("ping_req", via_address))
        raise PeerUnreachable(via_address)

    async def push_pull(
        self, address: str, state: FullState, timeout: float,  # noqa: ASYNC109
    ) -> FullState:
        self.sent.append(("push_pull", address))
        raise PeerUnreachable(address)


def m(name: str, inc: int = 0, status: str = "alive",
      catalogs: tuple[tuple[str, int], ...] = ()) -> Member:
    return Member(name, f"{name}:7443", inc, status, EPOCH, catalogs)  # type: ignore[arg-type]


def node(name: str = "a", inc: int = 0, *, config: GossipConfig | None = None,
         transport: ScriptedTransport | None = None, store: InMemoryMemberStore | None = None,
         catalogs: tuple[tuple[str, int], ...] = (), clock: Clock | None = None) -> Swim:
    return Swim(m(name, inc, catalogs=catalogs), [], transport or ScriptedTransport(),
                store=store or InMemoryMemberStore(), clock=clock or ManualClock(),
                rng=random.Random(7), config=config)


# ---- configuration -------------------------------------------------------------------------


def test_default_config_is_memberlist_lan() -> None:
    """Defaults match memberlist's LAN profile as the issue specifies."""
    c = GossipConfig()
    assert (c.gossip_interval, c.fanout, c.probe_interval, c.probe_timeout, c.indirect_checks,
            c.suspicion_mult, c.retransmit_mult) == (0.2, 3, 1.0, 0.5, 3, 4, 4)


def test_wan_preset_overrides_timings_only() -> None:
    """wan() slows gossip, probing and suspicion but keeps fanout and limits."""
    c = GossipConfig.wan()
    assert (c.gossip_interval, c.probe_interval, c.probe_timeout, c.suspicion_mult) == (
        0.5, 5.0, 3.0, 6)
    assert c.fanout == 3 and c.limits == MemberLimits()


@pytest.mark.parametrize(("n", "seconds"), [(3, 4.0), (10, 4.0), (100, 8.0), (1000, 12.0)])
def test_suspicion_timeout_follows_memberlist(n: int, seconds: float) -> None:
    """Suspicion lasts suspicion_mult × log10(max(N, 10)) × probe_interval."""
    assert GossipConfig().suspicion_timeout(n) == pytest.approx(seconds)


def test_retransmit_limit_grows_with_log_n() -> None:
    """Each update is retransmitted retransmit_mult × ceil(log10(N + 1)) times."""
    c = GossipConfig()
    assert [c.retransmit_limit(n) for n in (1, 9, 10, 128)] == [4, 4, 8, 12]


def test_config_refuses_probe_timeout_without_room_for_indirect_probes() -> None:
    """A probe timeout not shorter than the probe interval is a configuration error."""
    with pytest.raises(ValueError, match="probe_timeout"):
        GossipConfig(probe_timeout=1.0, probe_interval=1.0)


# ---- inbound validation --------------------------------------------------------------------


async def test_ping_with_forged_sender_is_refused() -> None:
    """A ping whose claimed sender differs from the authenticated peer is refused."""
    a = node()
    with pytest.raises(ForgedSender):
        await a.handle_ping("mallory", ProbeMessage(source=m("b")))
    assert a.get("b") is None


async def test_push_pull_with_forged_sender_is_refused() -> None:
    """A push-pull whose claimed sender differs from the authenticated peer is refused."""
    a = node()
    with pytest.raises(ForgedSender):
        await a.handle_push_pull("mallory", FullState(source=m("b"), members=(m("c"),)))
    assert a.get("c") is None


async def test_invalid_update_refuses_whole_message() -> None:
    """One invalid piggybacked entry rejects the message and leaves state untouched."""
    a = node()
    msg = ProbeMessage(source=m("b"), updates=(m("c"), m("d", status="zombie")))
    with pytest.raises(InvalidGossip, match="status"):
        await a.handle_ping("b", msg)
    assert [x.name for x in a.members()] == ["a"]


async def test_sender_cannot_claim_to_be_suspect_or_dead() -> None:
    """A node speaking for itself may only say it is alive or has left."""
    with pytest.raises(InvalidGossip, match="alive"):
        await node().handle_ping("b", ProbeMessage(source=m("b", status="dead")))


async def test_push_pull_refuses_more_than_max_members() -> None:
    """A full state with more entries than max_members is refused."""
    a = node(config=GossipConfig(limits=MemberLimits(max_members=3)))
    state = FullState(source=m("b"), members=tuple(m(f"n{i}") for i in range(4)))
    with pytest.raises(InvalidGossip, match="exceeds"):
        await a.handle_push_pull("b", state)


async def test_absurd_incarnation_jump_is_refused() -> None:
    """An incarnation beyond known + max_incarnation_jump is refused."""
    a = node(config=GossipConfig(limits=MemberLimits(max_incarnation_jump=100)))
    with pytest.raises(InvalidGossip, match="implausibly"):
        await a.handle_ping("b", ProbeMessage(source=m("b", 101)))


async def test_ping_req_refuses_oversize_target() -> None:
    """A ping-req naming an oversize target is refused before any probe is sent."""
    transport = ScriptedTransport()
    a = node(transport=transport)
    with pytest.raises(InvalidGossip, match="target"):
        await a.handle_ping_req("b", "t" * 300, "t:1", ProbeMessage(source=m("b")))
    assert transport.sent == []


# ---- merging and refutation ----------------------------------------------------------------


async def test_ping_teaches_receiver_about_sender_and_updates() -> None:
    """The sender's own entry and its piggybacked updates are merged on a ping."""
    a = node()
    await a.handle_ping("b", ProbeMessage(source=m("b", 2), updates=(m("c", 1, "suspect"),)))
    assert a.get("b") == m("b", 2) and a.get("c") == m("c", 1, "suspect")


@pytest.mark.parametrize("status", ["suspect", "dead"])
async def test_node_refutes_suspicion_by_bumping_its_incarnation(status: str) -> None:
    """Hearing itself suspected or dead at i, a node becomes alive at i + 1 and says so."""
    a = node(inc=3)
    reply = await a.handle_ping("b", ProbeMessage(source=m("b"), updates=(m("a", 3, status),)))
    assert (reply.source.incarnation, reply.source.status) == (4, "alive")
    assert [(u.incarnation, u.status) for u in reply.updates if u.name == "a"] == [(4, "alive")]


async def test_refutation_via_push_pull_outbids_the_claim() -> None:
    """A dead claim at a higher incarnation is outbid by one, whatever path it came by."""
    a = node(inc=1)
    reply = await a.handle_push_pull("b", FullState(source=m("b"), members=(m("a", 9, "dead"),)))
    assert reply.source.incarnation == 10
    assert a.get("a") is not None and a.get("a").status == "alive"  # type: ignore[union-attr]


async def test_stale_claim_about_self_is_ignored() -> None:
    """A suspicion at an older incarnation needs no refutation."""
    a = node(inc=5)
    reply = await a.handle_ping("b", ProbeMessage(source=m("b"), updates=(m("a", 4, "dead"),)))
    assert reply.source.incarnation == 5


async def test_left_node_does_not_refute() -> None:
    """After leaving, a node does not come back to life when others call it dead."""
    a = node(inc=1)
    await a.leave()
    await a.handle_ping("b", ProbeMessage(source=m("b"), updates=(m("a", 2, "dead"),)))
    assert (a.local_member().status, a.local_member().incarnation) == ("left", 2)


async def test_dead_member_is_not_resurrected_by_third_party() -> None:
    """An alive claim about a dead member from a third party needs a higher incarnation."""
    a = node()
    await a.handle_ping("b", ProbeMessage(source=m("b"), updates=(m("c", 2, "dead"),)))
    await a.handle_ping("b", ProbeMessage(source=m("b"), updates=(m("c", 2),)))
    assert a.get("c").status == "dead"  # type: ignore[union-attr]
    await a.handle_ping("b", ProbeMessage(source=m("b"), updates=(m("c", 3),)))
    assert a.get("c").status == "alive"  # type: ignore[union-attr]


async def test_ack_tells_a_suspected_sender_what_we_think() -> None:
    """Replying to a node we suspect, we put our suspicion first so it refutes at once."""
    a = node()
    await a.handle_ping("c", ProbeMessage(source=m("c"), updates=(m("b", 1, "suspect"),)))
    for _ in range(20):  # spend the suspicion's ordinary retransmissions
        await a.handle_ping("c", ProbeMessage(source=m("c")))
    reply = await a.handle_ping("b", ProbeMessage(source=m("b", 1)))
    assert reply.updates[0] == m("b", 1, "suspect")


async def test_push_pull_reply_carries_only_what_the_requester_lacks() -> None:
    """The push-pull reply holds entries newer than, or missing from, the request."""
    a = node()
    await a.handle_ping("c", ProbeMessage(source=m("c", 2), updates=(m("d", 1),)))
    reply = await a.handle_push_pull("b", FullState(source=m("b"), members=(m("c", 2), m("a"))))
    assert reply.source.name == "a"
    assert sorted(x.name for x in reply.members) == ["d"]


async def test_set_catalogs_bumps_incarnation() -> None:
    """Publishing a new catalog list raises the node's incarnation so it wins everywhere."""
    a = node(inc=2)
    a.set_catalogs((("dbs_outcomes", 2),))
    me = a.local_member()
    assert (me.incarnation, me.catalogs) == (3, (("dbs_outcomes", 2),))


# ---- query API and events ------------------------------------------------------------------


async def test_alive_with_catalog_filters_status_and_catalog() -> None:
    """Only alive members publishing the named catalog are returned, self included."""
    a = node(catalogs=(("dbs_outcomes", 1),))
    updates = (m("c", 0, "alive", (("dbs_outcomes", 2),)),
               m("d", 0, "suspect", (("dbs_outcomes", 1),)),
               m("e", 0, "alive", (("other", 1),)))
    await a.handle_ping("b", ProbeMessage(source=m("b"), updates=updates))
    assert [x.name for x in a.alive_with_catalog("dbs_outcomes")] == ["a", "c"]
    assert [x.name for x in a.alive_with_catalog("dbs_outcomes", include_suspect=True)] == [
        "a", "c", "d"]


async def test_subscribers_see_changes_until_unsubscribed() -> None:
    """A listener gets each accepted change with its previous value, and none after leaving."""
    a = node()
    seen: list[MemberChange] = []
    unsubscribe = a.subscribe(seen.append)
    await a.handle_ping("b", ProbeMessage(source=m("b")))
    await a.handle_ping("c", ProbeMessage(source=m("c"), updates=(m("b", 0, "suspect"),)))
    unsubscribe()
    await a.handle_ping("c", ProbeMessage(source=m("c"), updates=(m("b", 0, "dead"),)))
    assert [(c.current.name, c.previous and c.previous.status, c.current.status)
            for c in seen] == [("b", None, "alive"), ("c", None, "alive"),
                               ("b", "alive", "suspect")]


async def test_failing_listener_does_not_break_merging() -> None:
    """An exception in a listener is contained; the change is still applied."""
    a = node()

    def broken(change: MemberChange) -> None:
        raise RuntimeError("metrics down")

    a.subscribe(broken)
    await a.handle_ping("b", ProbeMessage(source=m("b")))
    assert a.get("b") == m("b")


# ---- ping-req ------------------------------------------------------------------------------


async def test_ping_req_reports_the_target_ack() -> None:
    """A relay returns True when the target acks its ping and False when it cannot reach it."""
    transport = ScriptedTransport()
    transport.pings["t:7443"] = lambda msg: ProbeMessage(source=m("t"))
    a = node(transport=transport)
    known = ProbeMessage(source=m("b"), updates=(m("t"), m("u")))
    assert await a.handle_ping_req("b", "t", "t:7443", known) is True
    assert await a.handle_ping_req("b", "u", "u:7443", known) is False


async def test_ping_req_is_false_when_someone_else_answers() -> None:
    """An ack from a different node at the target's address does not count."""
    transport = ScriptedTransport()
    transport.pings["t:7443"] = lambda msg: ProbeMessage(source=m("imposter"))
    a = node(transport=transport)
    known = ProbeMessage(source=m("b"), updates=(m("t"),))
    assert await a.handle_ping_req("b", "t", "t:7443", known) is False


async def test_ping_req_probes_only_known_members_at_their_known_address() -> None:
    """A PingReq names a target and an address: the relay pings only a member it knows,
    at the address it knows it by — never an address the caller chose (each would also
    stay cached as a channel), and an unknown name is simply not acked."""
    transport = ScriptedTransport()
    transport.pings["t:7443"] = lambda msg: ProbeMessage(source=m("t"))
    transport.pings["evil:1"] = lambda msg: ProbeMessage(source=m("t"))
    a = node(transport=transport)
    assert await a.handle_ping_req("b", "nobody", "evil:1", ProbeMessage(source=m("b"))) is False
    known = ProbeMessage(source=m("b"), updates=(m("t"),))
    assert await a.handle_ping_req("b", "t", "evil:1", known) is True
    assert ("ping", "evil:1") not in transport.sent and ("ping", "t:7443") in transport.sent


# ---- piggyback buffer ----------------------------------------------------------------------


def test_broadcast_queue_sends_each_update_limit_times_least_sent_first() -> None:
    """Every update goes out exactly `limit` times, least-sent first, then is dropped."""
    q = BroadcastQueue()
    for i in range(10):
        q.enqueue(m(f"n{i}"))
    sent: dict[str, int] = {}
    while len(q):
        batch = q.take(3, limit=4)
        assert len(batch) <= 3
        for x in batch:
            sent[x.name] = sent.get(x.name, 0) + 1
    assert sent == {f"n{i}": 4 for i in range(10)}


def test_broadcast_queue_keeps_only_the_newest_update_per_member() -> None:
    """Newer news about a member replaces the queued older one."""
    q = BroadcastQueue()
    q.enqueue(m("b", 1))
    q.enqueue(m("b", 2, "suspect"))
    assert q.take(8, limit=1) == [m("b", 2, "suspect")]
    assert len(q) == 0


async def test_probe_messages_are_bounded_whatever_the_backlog() -> None:
    """With hundreds of pending updates, a ping or ack carries at most max_piggyback."""
    a = node(config=GossipConfig(max_piggyback=5))
    await a.handle_push_pull("b", FullState(source=m("b"),
                                            members=tuple(m(f"n{i}") for i in range(300))))
    reply = await a.handle_ping("c", ProbeMessage(source=m("c")))
    assert len(reply.updates) == 5


# ---- persistence ---------------------------------------------------------------------------


def test_restart_comes_back_with_stored_incarnation_plus_one() -> None:
    """A node restored from its store is alive at stored + 1 and remembers its peers."""
    store = InMemoryMemberStore([m("a", 7, "left"), m("b", 3), m("c", 1, "dead")])

    async def scenario() -> tuple[Member, Member | None, list[Member]]:
        a = node(store=store, clock=SimClock())
        task = asyncio.create_task(a.run())
        await asyncio.sleep(0.01)
        await a.shutdown()
        await task
        return a.local_member(), a.get("c"), await store.load()

    me, c, saved = run_virtual(scenario())
    assert (me.incarnation, me.status) == (8, "alive")
    assert c is not None and c.status == "dead"
    assert [(x.name, x.incarnation) for x in saved if x.name == "a"] == [("a", 8)]


def test_run_twice_is_refused_and_shutdown_is_idempotent() -> None:
    """run() is single-use; shutdown() may be called any number of times."""

    async def scenario() -> None:
        a = node(clock=SimClock())
        task = asyncio.create_task(a.run())
        await asyncio.sleep(0.01)
        await a.shutdown()
        await a.shutdown()
        await task
        with pytest.raises(RuntimeError):
            await a.run()

    run_virtual(scenario())


# ---- whole clusters under virtual time -----------------------------------------------------


def test_eight_nodes_converge_from_one_seed_within_two_log2_n_rounds() -> None:
    """Started together with one seed, 8 nodes all see each other alive in ≤ 2·log2(8) rounds."""

    async def scenario() -> float | None:
        async with SimCluster(8, seed=3) as cluster:
            bound = 2 * math.log2(8) * cluster.config.gossip_interval
            return await cluster.wait_until(cluster.converged, bound)

    assert run_virtual(scenario()) is not None


def _detection_bound(config: GossipConfig, n: int) -> float:
    # Round-robin over a reshuffled list reaches any target within 2(N-1) probes; then a
    # probe interval for direct+indirect, the suspicion timeout, and gossip to everyone.
    return ((2 * (n - 1) + 1) * config.probe_interval + config.suspicion_timeout(n)
            + 2 * math.log2(n) * config.gossip_interval)


def test_killed_node_is_suspected_then_dead_everywhere_within_bound() -> None:
    """Every survivor marks a crashed node dead within the bound, never before suspicion
    ran its course, and never bumps the dead node's incarnation."""

    async def scenario() -> None:
        async with SimCluster(8, seed=5) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            victim = cluster.names[3]
            incarnation = cluster.nodes[victim].local_member().incarnation
            loop = asyncio.get_running_loop()
            events: list[tuple[float, str, str]] = []
            for name in cluster.names:
                if name != victim:
                    cluster.nodes[name].subscribe(
                        lambda c, o=name: events.append((loop.time(), o, c.current.status))
                        if c.current.name == victim else None)
            await cluster.kill(victim)
            killed_at = loop.time()
            bound = _detection_bound(cluster.config, 8)
            took = await cluster.wait_until(
                lambda: cluster.all_see([victim], ("dead",)), bound)
            assert took is not None
            first_suspect = min(t for t, _, s in events if s == "suspect")
            first_dead = min(t for t, _, s in events if s == "dead")
            assert killed_at < first_suspect
            assert first_dead - first_suspect >= cluster.config.suspicion_timeout(7) - 1e-6
            for name in cluster.running:
                assert cluster.nodes[name].get(victim).incarnation == incarnation  # type: ignore[union-attr]

    run_virtual(scenario())


def test_restarted_node_is_alive_everywhere_with_higher_incarnation() -> None:
    """A crashed node restarted from its store is alive on every member at a higher
    incarnation than it had before."""

    async def scenario() -> None:
        async with SimCluster(6, seed=11) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            name = cluster.names[2]
            before = cluster.nodes[name].local_member().incarnation
            await cluster.kill(name)
            await cluster.wait_until(lambda: cluster.all_see([name], ("dead",)), 60)
            cluster.restart(name)
            took = await cluster.wait_until(cluster.converged, 10)
            assert took is not None
            for observer in cluster.running:
                seen = cluster.nodes[observer].get(name)
                assert seen is not None and seen.incarnation > before

    run_virtual(scenario())


def test_partition_is_detected_on_both_sides_and_heals() -> None:
    """Split 2+3, each side marks the other suspect or dead; after healing all converge."""
    config = GossipConfig(reconnect_interval=2.0)

    async def scenario() -> None:
        async with SimCluster(5, config=config, seed=13) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            left, right = cluster.names[:2], cluster.names[2:]
            cluster.network.partition(left, right)
            split = await cluster.wait_until(
                lambda: cluster.all_see(right, ("suspect", "dead"), observers=left)
                and cluster.all_see(left, ("suspect", "dead"), observers=right), 60)
            assert split is not None
            assert cluster.all_see(left, ("alive",), observers=left)
            assert cluster.all_see(right, ("alive",), observers=right)
            # Heal only once both sides have given up on each other: reconnecting to the
            # dead is then the only way back.
            assert await cluster.wait_until(
                lambda: cluster.all_see(right, ("dead",), observers=left)
                and cluster.all_see(left, ("dead",), observers=right), 60) is not None
            await asyncio.sleep(5)
            cluster.network.heal()
            assert await cluster.wait_until(cluster.converged, 60) is not None

    run_virtual(scenario())


def test_graceful_leave_is_seen_as_left_everywhere() -> None:
    """A node that leaves is marked left (not dead) by every remaining member."""

    async def scenario() -> None:
        async with SimCluster(6, seed=17) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            name = cluster.names[4]
            await cluster.leave(name)
            took = await cluster.wait_until(lambda: cluster.all_see([name], ("left",)), 30)
            assert took is not None

    run_virtual(scenario())


def test_nodes_keep_retrying_until_the_seed_comes_up() -> None:
    """Nodes whose only seed is down keep retrying with backoff and join once it is up."""

    async def scenario() -> None:
        cluster = SimCluster(4, seed=19)
        cluster.start(cluster.names[1:])
        await asyncio.sleep(20)
        assert all(len(cluster.nodes[n].members()) == 1 for n in cluster.names[1:])
        cluster.start(cluster.names[:1])
        try:
            limit = cluster.config.join_backoff_max + 5
            assert await cluster.wait_until(cluster.converged, limit) is not None
        finally:
            await cluster.stop()

    run_virtual(scenario())


def test_lossy_network_converges_without_false_deaths() -> None:
    """With 10% of messages lost, members still converge and nobody alive ends up dead."""

    async def scenario() -> None:
        async with SimCluster(8, seed=23, drop_rate=0.1) as cluster:
            assert await cluster.wait_until(cluster.converged, 10) is not None
            await asyncio.sleep(30)
            assert cluster.all_see(cluster.running, ("alive", "suspect"))

    run_virtual(scenario())


def test_probe_messages_stay_bounded_during_churn() -> None:
    """While 32 nodes join and one dies, no probe-path message exceeds max_piggyback + 1
    entries, so per-member probe traffic does not grow with N."""

    async def scenario() -> None:
        async with SimCluster(32, seed=29) as cluster:
            await cluster.wait_until(cluster.converged, 10)
            await cluster.kill(cluster.names[7])
            await asyncio.sleep(15)
            biggest_entry = max(member_size(x.local_member()) for x in cluster.nodes.values())
            bound = (cluster.config.max_piggyback + 1) * (biggest_entry + 8)
            assert 0 < cluster.network.traffic.largest["probe"] <= bound

    run_virtual(scenario())


def test_only_a_node_raises_its_own_incarnation() -> None:
    """Across a run with a crash, every member's incarnation as seen by others is one the
    member itself announced."""

    async def scenario() -> None:
        async with SimCluster(6, seed=31) as cluster:
            announced: dict[str, set[int]] = {n: set() for n in cluster.names}
            for _ in range(200):
                for n in cluster.running:
                    announced[n].add(cluster.nodes[n].local_member().incarnation)
                await asyncio.sleep(0.05)
                if _ == 10:
                    await cluster.kill(cluster.names[1])
            for observer in cluster.running:
                for x in cluster.nodes[observer].members():
                    assert x.incarnation in announced[x.name]

    run_virtual(scenario())


# ---- wire helpers and error mapping --------------------------------------------------------


def test_from_entries_separates_the_sender_entry() -> None:
    """A flat entry list (as in the proto) round-trips through entries()/from_entries()."""
    msg = ProbeMessage(source=m("b", 2), updates=(m("c"), m("d", 1, "dead")))
    assert ProbeMessage.from_entries("b", list(msg.entries())) == msg
    state = FullState(source=m("b"), members=(m("c"),))
    assert FullState.from_entries("b", state.entries()) == state


@pytest.mark.parametrize("entries", [[m("c")], [m("b"), m("b", 1)]])
def test_from_entries_needs_exactly_one_sender_entry(entries: list[Member]) -> None:
    """A flat entry list without, or with two, entries for its sender is refused."""
    with pytest.raises(InvalidGossip, match="exactly one"):
        ProbeMessage.from_entries("b", entries)


def test_gossip_errors_map_to_grpc_codes_through_the_error_vocabulary() -> None:
    """Refusals are StimnetErrors carrying INVALID_ARGUMENT or PERMISSION_DENIED."""
    assert isinstance(InvalidGossip("x"), InvalidRequest)
    assert (InvalidGossip("x").code, ForgedSender("x").code) == (
        "INVALID_ARGUMENT", "PERMISSION_DENIED")
    assert isinstance(ForgedSender("x"), StimnetError)
