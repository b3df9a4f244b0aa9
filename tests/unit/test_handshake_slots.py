"""Handshake slots: bounded in all and per address; the rest wait in order, boundedly."""

from __future__ import annotations

from collections.abc import Callable

from stimnetd.handshake_slots import Admission, HandshakeSlots


def _slots(turns: list[str], **limits: int
           ) -> tuple[HandshakeSlots, Callable[[str, str], Admission]]:
    slots = HandshakeSlots(**{"max_in_all": 3, "max_per_host": 2, "max_waiting": 2, **limits})

    def admit(name: str, host: str) -> Admission:
        return slots.admit(name, host, lambda: turns.append(name))
    return slots, admit


def test_over_a_limit_a_connection_waits_and_the_waiting_room_is_bounded() -> None:
    """Past the per-address limit a connection waits; once the waiting room is full, the
    next is refused, from any address over a limit."""
    turns: list[str] = []
    slots, admit = _slots(turns)
    assert [admit(n, "a") for n in ("a1", "a2", "a3", "a4")] == [
        Admission.NOW, Admission.NOW, Admission.WAIT, Admission.WAIT]
    assert admit("b1", "b") is Admission.NOW  # another address is not held up
    assert admit("b2", "b") is Admission.FULL  # over the limit in all, and no room to wait
    assert (slots.handshaking, slots.by_host, slots.waiting) == (3, {"a": 2, "b": 1}, 2)


def test_a_freed_slot_goes_to_the_oldest_waiter_that_may_take_it() -> None:
    """A slot freed by one address goes to the oldest waiter under its own address's limit;
    a newcomer does not overtake waiters of its own address."""
    turns: list[str] = []
    slots, admit = _slots(turns, max_in_all=3, max_waiting=3)
    for name, host in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        admit(name, host)
    assert [admit(n, h) for n, h in (("a3", "a"), ("b2", "b"))] == [Admission.WAIT] * 2
    slots.release("b")  # b is under its limit again: b2 goes, though a3 is older
    assert turns == ["b2"]
    slots.release("a")
    assert turns == ["b2", "a3"]
    assert admit("a4", "a") is Admission.WAIT  # a is at its limit again
    slots.withdraw("a4")  # it hung up
    for host in ("a", "a", "b"):
        slots.release(host)
    assert (turns, slots.handshaking, slots.by_host, slots.waiting) == (["b2", "a3"], 0, {}, 0)
