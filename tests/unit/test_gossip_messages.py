"""What gossip nodes exchange: the piggyback queue (stimnetd.gossip.broadcast), probe and
full-state messages (stimnetd.gossip.transport) and the errors a refusal carries."""

from __future__ import annotations

import pytest

from stimnet.errors import InvalidRequest, StimnetError
from stimnetd.gossip.broadcast import BroadcastQueue
from stimnetd.gossip.membership import ForgedSender, InvalidGossip, Member
from stimnetd.gossip.transport import FullState, ProbeMessage
from tests.unit.gossip_fakes import m

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
