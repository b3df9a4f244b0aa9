"""Merge rules, validation and persistence of membership state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stimnetd.gossip.membership import (
    STATUSES,
    InMemoryMemberStore,
    InvalidGossip,
    Member,
    MemberLimits,
    PeerTable,
    precedence,
    supersedes,
    validate_members,
)

NOW = 1_767_225_600.0


def member(name: str = "b", inc: int = 1, status: str = "alive", *, address: str = "",
           catalogs: tuple[tuple[str, int], ...] = ()) -> Member:
    return Member(name, address or f"{name}.example:7443", inc, status, NOW, catalogs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("old", "new", "wins"),
    [
        # alive@i overrides suspect/alive below i, and nothing at i
        (("alive", 1), ("alive", 2), True),
        (("suspect", 1), ("alive", 2), True),
        (("suspect", 2), ("alive", 2), False),
        (("alive", 2), ("alive", 2), False),
        # suspect@i overrides alive at or below i
        (("alive", 2), ("suspect", 2), True),
        (("alive", 1), ("suspect", 2), True),
        (("alive", 3), ("suspect", 2), False),
        # dead@i overrides alive and suspect at or below i
        (("alive", 2), ("dead", 2), True),
        (("suspect", 2), ("dead", 2), True),
        (("alive", 3), ("dead", 2), False),
        # third-party claims cannot resurrect the dead without a higher incarnation
        (("dead", 2), ("alive", 2), False),
        (("dead", 2), ("suspect", 2), False),
        (("dead", 2), ("alive", 3), True),
        # left is final for its incarnation; only a rejoin at a higher one overrides it
        (("left", 2), ("alive", 2), False),
        (("left", 2), ("dead", 2), False),
        (("left", 2), ("suspect", 2), False),
        (("left", 2), ("alive", 3), True),
        (("dead", 2), ("left", 2), True),
    ],
)
def test_merge_rule_table(old: tuple[str, int], new: tuple[str, int], wins: bool) -> None:
    """Each SWIM/memberlist precedence rule decides whether a claim replaces the entry."""
    table = PeerTable("a", 1024)
    table.apply(member(status=old[0], inc=old[1]), NOW)
    change = table.apply(member(status=new[0], inc=new[1]), NOW + 1)
    assert (change is not None) is wins
    expected = new if wins else old
    current = table.get("b")
    assert current is not None
    assert (current.status, current.incarnation) == expected


def test_unknown_member_is_added_with_local_last_heard() -> None:
    """A claim about an unknown member is accepted and stamped with the local time."""
    table = PeerTable("a", 1024)
    change = table.apply(member(status="suspect", inc=4), NOW + 5)
    assert change is not None and change.previous is None
    assert table.get("b") == Member("b", "b.example:7443", 4, "suspect", NOW + 5, ())


claims = st.builds(
    member,
    name=st.sampled_from(["b", "c", "d"]),
    inc=st.integers(0, 4),
    status=st.sampled_from(STATUSES),
    address=st.sampled_from(["x:1", "y:1"]),
    catalogs=st.sampled_from([(), (("dbs_outcomes", 1),), (("dbs_outcomes", 2),)]),
)


def _merged(items: list[Member]) -> dict[str, tuple[object, ...]]:
    table = PeerTable("a", 1024)
    for m in items:
        table.apply(m, NOW)
    return {m.name: precedence(m) for m in table.members()}


@given(st.lists(claims, max_size=12), st.randoms())
def test_merge_is_order_independent(items: list[Member], rnd: object) -> None:
    """Any arrival order of the same claims yields the same table (merge commutes)."""
    shuffled = list(items)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert _merged(items) == _merged(shuffled)


@given(st.lists(claims, max_size=12))
def test_merge_is_idempotent(items: list[Member]) -> None:
    """Receiving every claim twice changes nothing beyond receiving it once."""
    assert _merged(items + items) == _merged(items)


@given(st.lists(claims, max_size=20))
def test_incarnation_and_precedence_never_decrease(items: list[Member]) -> None:
    """A member's stored incarnation and claim precedence only ever grow."""
    table = PeerTable("a", 1024)
    for m in items:
        before = table.get(m.name)
        table.apply(m, NOW)
        after = table.get(m.name)
        assert after is not None
        if before is not None:
            assert after.incarnation >= before.incarnation
            assert precedence(after) >= precedence(before)


@given(claims, claims)
def test_supersedes_is_a_strict_order(x: Member, y: Member) -> None:
    """Of two different claims exactly one wins, so replicas cannot flip-flop."""
    if precedence(x) == precedence(y):
        assert (supersedes(x, y), supersedes(y, x)) == (False, False)
    else:
        assert supersedes(x, y) != supersedes(y, x)


def test_table_refuses_claims_about_its_owner() -> None:
    """Claims about the node itself never enter its peer table (Swim refutes them)."""
    with pytest.raises(ValueError):
        PeerTable("a", 1024).apply(member(name="a", status="dead"), NOW)


def test_full_table_evicts_oldest_tombstone_for_a_newcomer() -> None:
    """At max_members a newcomer replaces the oldest dead/left entry, not a live one."""
    table = PeerTable("a", 4)
    table.apply(member("b"), NOW)
    table.apply(member("c", status="dead"), NOW)
    table.apply(member("d", status="left"), NOW + 1)
    assert table.apply(member("e"), NOW + 2) is not None
    assert sorted(m.name for m in table.members()) == ["b", "d", "e"]


def test_full_table_without_tombstones_ignores_newcomers() -> None:
    """At max_members with every entry live, a newcomer is dropped rather than growing."""
    table = PeerTable("a", 3)
    table.apply(member("b"), NOW)
    table.apply(member("c"), NOW)
    assert table.apply(member("d"), NOW) is None
    assert "d" not in table


def _known(name: str) -> Member | None:
    return member(name, inc=5)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (member(status="zombie"), "unknown status"),
        (member(inc=-1), "non-negative"),
        (member(inc=True), "non-negative"),  # type: ignore[arg-type]
        (member(inc=5 + 1_000_001), "implausibly large"),
        (member(name="x" * 254), "name"),
        (member(name=""), "name"),
        (member(name="b\n"), "unprintable"),
        (member(address="h" * 513), "address"),
        (member(catalogs=tuple((f"c{i}", 1) for i in range(257))), "catalog list"),
        (member(catalogs=(("c" * 129, 1),)), "catalog name"),
        (member(catalogs=(("c", -1),)), "schema_version"),
        (member(catalogs=[("c", 1)]), "catalog list"),  # type: ignore[arg-type]
        (Member("b", "b:1", 1, "alive", float("nan")), "finite"),
    ],
)
def test_validation_refuses_malformed_entries(bad: Member, reason: str) -> None:
    """Malformed or implausible entries are refused with InvalidGossip naming the problem."""
    with pytest.raises(InvalidGossip, match=reason):
        validate_members([bad], MemberLimits(), _known)


def test_validation_accepts_plausible_entries() -> None:
    """Entries within every limit pass, including an incarnation exactly at the jump bound."""
    validate_members(
        [member(inc=5 + 1_000_000, catalogs=(("dbs_outcomes", 3),)), member("c", status="left")],
        MemberLimits(), _known)


@pytest.mark.parametrize(
    "repeat",
    [
        Member("b", "b.example:7443", 5, "alive", float("inf")),
        Member("b", "b.example:7443", True, "alive", NOW),  # type: ignore[arg-type]
        member(inc=5, catalogs=(("c", True),)),  # type: ignore[arg-type]
    ],
)
def test_repeat_of_known_entry_is_still_checked(repeat: Member) -> None:
    """An entry equal to the known one still fails if its own fields are malformed."""
    known = {"b": member(inc=1 if repeat.incarnation is True else 5, catalogs=(("c", 1),)
                         if repeat.catalogs else ())}
    with pytest.raises(InvalidGossip):
        validate_members([repeat], MemberLimits(), known.get)


def test_validation_refuses_too_many_entries() -> None:
    """A batch longer than max_members is refused as a whole."""
    batch = [member(f"n{i}") for i in range(5)]
    with pytest.raises(InvalidGossip, match="exceeds"):
        validate_members(batch, MemberLimits(max_members=4), _known)


def test_validation_refuses_duplicate_names() -> None:
    """Two entries for the same member in one message are refused."""
    with pytest.raises(InvalidGossip, match="twice"):
        validate_members([member(), member(inc=2)], MemberLimits(), _known)


def test_incarnation_jump_limit_is_configurable() -> None:
    """max_incarnation_jump is measured from the known incarnation and is a parameter."""
    limits = MemberLimits(max_incarnation_jump=10)
    validate_members([member(inc=15)], limits, _known)
    with pytest.raises(InvalidGossip):
        validate_members([member(inc=16)], limits, _known)
    with pytest.raises(InvalidGossip):
        validate_members([member(inc=11)], limits, lambda _name: None)


async def test_in_memory_store_round_trips() -> None:
    """The in-memory store returns exactly what was last saved."""
    store = InMemoryMemberStore()
    assert await store.load() == []
    saved = [member("b"), member("c", status="dead", inc=3)]
    await store.save(saved)
    saved.append(member("d"))  # the store keeps its own copy
    assert await store.load() == saved[:2]
