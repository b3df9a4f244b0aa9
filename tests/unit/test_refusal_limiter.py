"""Refused calls: the first of a minute audited one by one per source, the rest counted."""

from __future__ import annotations

import pytest

from stimnetd.rpc.refusals import GLOBAL_FACTOR, MAX_KINDS, OVERFLOW, RefusalLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_gets_burst_entries_then_one_summary_per_window() -> None:
    """A source's first `burst` refusals are audited one by one, the rest summarised once when
    the window ends."""
    clock = Clock()
    lim = RefusalLimiter(burst=3, window_s=60, clock=clock)
    admitted = [lim.admit("10.0.0.9", "anonymous", "/m/A", "no certificate") for _ in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    clock.now += 59
    assert lim.due() == []  # the window has not ended
    clock.now += 1
    [summary] = lim.due()
    assert (summary.source, summary.role, summary.count) == ("10.0.0.9", "anonymous", 7)
    assert summary.methods == {"/m/A": 7} and summary.reasons == {"no certificate": 7}
    assert (summary.since, summary.until) == (1000.0, 1060.0)
    assert summary.detail()["suppressed"] == 7
    assert lim.due() == []  # summarised once
    # A new window: the source is audited afresh.
    assert lim.admit("10.0.0.9", "anonymous", "/m/A", "no certificate") is True


def test_sources_are_limited_apart_and_a_quiet_window_leaves_no_summary() -> None:
    """Each source has its own burst, and a source that stayed within it gets no summary."""
    clock = Clock()
    lim = RefusalLimiter(burst=2, window_s=10, clock=clock)
    for _ in range(2):
        assert lim.admit("a", "anonymous", "/m", "r") is True
        assert lim.admit("researcher/bob", "researcher", "/m", "r") is True
    assert lim.admit("a", "anonymous", "/m", "r") is False
    clock.now += 10
    assert [(s.source, s.count) for s in lim.due()] == [("a", 1)]


def test_everything_is_summarised_at_shutdown() -> None:
    """Counts of a window still open are summarised when everything is asked for (shutdown)."""
    clock = Clock()
    lim = RefusalLimiter(burst=1, window_s=60, clock=clock)
    lim.admit("a", "anonymous", "/m", "r")
    lim.admit("a", "anonymous", "/m", "r")
    assert lim.due() == []
    assert [(s.source, s.count) for s in lim.due(everything=True)] == [("a", 1)]


def test_many_sources_share_one_slot_and_one_global_budget() -> None:
    """An attacker with many addresses neither grows the table nor escapes the limit."""
    clock = Clock()
    lim = RefusalLimiter(burst=1, window_s=60, max_sources=4, clock=clock)
    admitted = [lim.admit(f"10.0.0.{i}", "anonymous", "/m", "r") for i in range(10)]
    # four sources tracked apart; the rest share the overflow slot (one entry for them all)
    assert admitted == [True] * 5 + [False] * 5
    clock.now += 60
    assert {(s.source, s.count) for s in lim.due()} == {(OVERFLOW, 5)}

    lim = RefusalLimiter(burst=1, window_s=60, max_sources=10_000, clock=clock)
    admitted = [lim.admit(f"s{i}", "anonymous", "/m", "r") for i in range(GLOBAL_FACTOR + 5)]
    assert admitted.count(True) == GLOBAL_FACTOR  # all sources together


def test_a_summary_names_a_bounded_number_of_methods_and_reasons() -> None:
    """A summary names at most MAX_KINDS methods (the rest as 'other') and truncates long
    reasons."""
    clock = Clock()
    lim = RefusalLimiter(burst=1, window_s=60, clock=clock)
    lim.admit("a", "anonymous", "/m", "r")
    for i in range(MAX_KINDS + 5):
        lim.admit("a", "anonymous", f"/m/{i}", "x" * 1000 + str(i))
    [summary] = lim.due(everything=True)
    assert len(summary.methods) == MAX_KINDS + 1 and summary.methods["other"] == 5
    assert [r for r in summary.reasons if len(r) > 200] == []
    assert sum(summary.methods.values()) == summary.count == MAX_KINDS + 5


@pytest.mark.parametrize("kwargs", [{"burst": 0}, {"window_s": 0}, {"max_sources": 0}])
def test_nonsense_limits_are_refused(kwargs: dict) -> None:
    """A zero burst, window or source table is refused when the limiter is made."""
    with pytest.raises(ValueError):
        RefusalLimiter(**kwargs)


async def test_a_condensed_count_the_audit_log_could_not_take_is_written_next_round() -> None:
    """A summary the audit log failed to take is kept and written in the next round."""
    from stimnetd.rpc.guard import Guard, Revocations

    written: list[tuple[str, str, dict]] = []
    broken = True

    async def audit(actor: str, role: str, action: str, decision: str, detail: dict) -> None:
        if broken:
            raise OSError("disk full")
        written.append((actor, decision, detail))

    clock = Clock()
    limiter = RefusalLimiter(burst=1, window_s=60, clock=clock)
    guard = Guard(identities=None, revocations=Revocations(),  # type: ignore[arg-type]
                  audit_refusal=audit, audit_allowed=lambda *a: None, refusals=limiter)
    for _ in range(4):
        limiter.admit("10.0.0.9", "anonymous", "/m", "no certificate")
    with pytest.raises(OSError):
        await guard.audit_condensed_refusals(everything=True)
    broken = False
    assert await guard.audit_condensed_refusals() == 1
    [(actor, decision, detail)] = written
    assert (actor, decision, detail["suppressed"]) == ("10.0.0.9", "denied-condensed", 3)
