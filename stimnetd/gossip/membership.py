"""Membership state: what one node believes about every member, and how claims merge.

Merging follows SWIM/memberlist: a claim about a member wins when it has a higher
incarnation, or the same incarnation and a more final status (alive < suspect < dead <
left). That is a total order, so merging is a join: the result does not depend on the
order or repetition in which claims arrive, which is what lets anti-entropy converge.
Only a member raises its own incarnation; that rule is enforced by `Swim`, which never
writes a higher incarnation for anyone but itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from stimnet.errors import InvalidRequest, PermissionDenied, StimnetError
from stimnet.numbers import finite_number

Status = Literal["alive", "suspect", "dead", "left"]
STATUSES: tuple[Status, ...] = ("alive", "suspect", "dead", "left")
_RANK = {status: rank for rank, status in enumerate(STATUSES)}


class GossipError(StimnetError):
    """A peer's gossip was refused; the error interceptor maps `code` to the wire."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidGossip(GossipError, InvalidRequest):
    """Malformed or implausible membership data (INVALID_ARGUMENT)."""


class ForgedSender(GossipError, PermissionDenied):
    """The message claims a sender other than the authenticated peer (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Member:
    """One node as some member sees it.

    `last_heard` is local (wall-clock seconds when this node last heard from or about the
    member); receivers overwrite it, so the wire encoding may omit it.
    """

    name: str
    address: str
    incarnation: int
    status: Status
    last_heard: float
    catalogs: tuple[tuple[str, int], ...] = ()

    def has_catalog(self, name: str) -> bool:
        return any(catalog == name for catalog, _ in self.catalogs)


def precedence(m: Member) -> tuple[int, int, str, tuple[tuple[str, int], ...]]:
    """Total order of claims about one member; the larger one wins.

    Address and catalogs only break ties between conflicting claims at the same
    incarnation and status (a node changes them by bumping its incarnation, so honest
    peers never produce such ties); they make merging deterministic even if one does.
    """
    return (m.incarnation, _RANK[m.status], m.address, m.catalogs)


def supersedes(new: Member, old: Member | None) -> bool:
    return old is None or precedence(new) > precedence(old)


def same_claim(a: Member, b: Member) -> bool:
    return precedence(a) == precedence(b)


@dataclass(frozen=True)
class MemberLimits:
    """Bounds on incoming gossip; anything beyond them is refused as `InvalidGossip`."""

    max_members: int = 1024
    # A peer can only have bumped its incarnation a handful of times per refutation; a
    # jump this large means a bug or an attempt to make a member unrefutable.
    max_incarnation_jump: int = 1_000_000
    max_name_len: int = 253
    max_address_len: int = 512
    max_catalogs: int = 256
    max_catalog_name_len: int = 128


def validate_members(
    members: Sequence[Member],
    limits: MemberLimits,
    known: Callable[[str], Member | None],
) -> None:
    """Refuse the whole batch if any entry is malformed or implausible.

    `known` returns this node's current entry for a name (None if unknown); incarnation
    jumps are measured from it, and entries repeating it verbatim skip re-validation
    (anti-entropy resends the whole table every round, so this is the hot path).
    """
    if len(members) > limits.max_members:
        raise InvalidGossip(f"{len(members)} members exceeds the limit of {limits.max_members}")
    seen: set[str] = set()
    for m in members:
        if not isinstance(m, Member) or not isinstance(m.name, str):
            raise InvalidGossip("entry is not a member")
        prior = known(m.name)
        if prior is None or not _repeats(m, prior):
            validate_member(m, limits, prior)
        elif not finite_number(m.last_heard):
            raise InvalidGossip("last_heard must be a finite number")
        if m.name in seen:
            raise InvalidGossip(f"member {m.name!r} appears twice")
        seen.add(m.name)


def _repeats(m: Member, prior: Member) -> bool:
    return (type(m.incarnation) is int and m.incarnation == prior.incarnation
            and m.status == prior.status and m.address == prior.address
            and type(m.catalogs) is tuple and m.catalogs == prior.catalogs
            and all(type(v) is int for _, v in m.catalogs))


def validate_member(m: Member, limits: MemberLimits, prior: Member | None) -> None:
    """Check one entry; `prior` is this node's current entry for the same name, if any."""
    if not isinstance(m, Member):
        raise InvalidGossip("entry is not a member")
    _check_text("name", m.name, limits.max_name_len)
    if not isinstance(m.address, str) or len(m.address) > limits.max_address_len:
        raise InvalidGossip("address missing or longer than allowed")
    if m.status not in _RANK:
        raise InvalidGossip(f"unknown status {m.status!r}")
    if type(m.incarnation) is not int or m.incarnation < 0:
        raise InvalidGossip("incarnation must be a non-negative integer")
    known_incarnation = prior.incarnation if prior is not None else 0
    if m.incarnation > known_incarnation + limits.max_incarnation_jump:
        raise InvalidGossip(f"incarnation jump for {m.name!r} is implausibly large")
    if not finite_number(m.last_heard):
        raise InvalidGossip("last_heard must be a finite number")
    if not isinstance(m.catalogs, tuple) or len(m.catalogs) > limits.max_catalogs:
        raise InvalidGossip("catalog list malformed or longer than allowed")
    for entry in m.catalogs:
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise InvalidGossip("catalog entry must be (name, schema_version)")
        catalog, version = entry
        _check_text("catalog name", catalog, limits.max_catalog_name_len)
        if type(version) is not int or version < 0:
            raise InvalidGossip("schema_version must be a non-negative integer")


def _check_text(what: str, value: object, max_len: int) -> None:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidGossip(f"{what} missing or longer than {max_len} characters")
    if not value.isprintable():
        raise InvalidGossip(f"{what} contains unprintable characters")


@dataclass(frozen=True)
class MemberChange:
    """An accepted claim: `previous` is None when the member was unknown."""

    previous: Member | None
    current: Member


class PeerTable:
    """This node's view of every *other* member (the node's own entry lives in `Swim`)."""

    def __init__(self, self_name: str, max_members: int) -> None:
        self._self_name = self_name
        self._max_members = max_members
        self._members: dict[str, Member] = {}

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def get(self, name: str) -> Member | None:
        return self._members.get(name)

    def incarnation(self, name: str) -> int:
        m = self._members.get(name)
        return m.incarnation if m is not None else 0

    def members(self) -> list[Member]:
        return list(self._members.values())

    def apply(self, claim: Member, now: float) -> MemberChange | None:
        """Merge one claim; return the change, or None if the claim adds nothing."""
        if claim.name == self._self_name:
            raise ValueError("claims about this node are refuted by Swim, not merged")
        old = self._members.get(claim.name)
        if not supersedes(claim, old):
            return None
        if old is None and not self._make_room():
            return None
        current = replace(claim, last_heard=now)
        self._members[claim.name] = current
        return MemberChange(old, current)

    def touch(self, name: str, now: float) -> None:
        m = self._members.get(name)
        if m is not None:
            self._members[name] = replace(m, last_heard=now)

    def restore(self, members: Iterable[Member]) -> None:
        """Load a persisted view verbatim (the store is trusted; it holds our own writes)."""
        for m in members:
            if m.name != self._self_name and supersedes(m, self._members.get(m.name)):
                self._members[m.name] = m

    def _make_room(self) -> bool:
        # The node itself takes one slot of max_members.
        if len(self._members) + 1 < self._max_members:
            return True
        tombstones = [m for m in self._members.values() if m.status in ("dead", "left")]
        if not tombstones:
            return False
        oldest = min(tombstones, key=lambda m: m.last_heard)
        del self._members[oldest.name]
        return True


class MemberStore(Protocol):
    """Durable membership, so a restarted node knows its peers and its last incarnation."""

    async def load(self) -> list[Member]: ...

    async def save(self, members: list[Member]) -> None: ...


class InMemoryMemberStore:
    """A `MemberStore` for tests and the simulator; survives a simulated restart because
    the same instance is handed to the new `Swim`."""

    def __init__(self, members: Iterable[Member] = ()) -> None:
        self._members = list(members)
        self.saves = 0

    async def load(self) -> list[Member]:
        return list(self._members)

    async def save(self, members: list[Member]) -> None:
        self._members = list(members)
        self.saves += 1
