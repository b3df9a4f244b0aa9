"""One SWIM node (stimnetd.gossip.swim.Swim): inbound validation, merging and refutation,
the query API and its events, ping-req, piggyback bounds and persistence."""

from __future__ import annotations

import asyncio

import pytest

from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.membership import (
    ForgedSender,
    InMemoryMemberStore,
    InvalidGossip,
    Member,
    MemberChange,
    MemberLimits,
)
from stimnetd.gossip.sim import SimClock, run_virtual
from stimnetd.gossip.transport import FullState, ProbeMessage
from tests.unit.gossip_fakes import ScriptedTransport, m, node

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


# ---- piggybacking ------------------------------------------------------------------------


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
