"""What a start does with each job the last stop left unfinished (jobs/recovery.py)."""

from __future__ import annotations

import dataclasses

import pytest

from stimnetd.jobs.recovery import INTERRUPTED, INTERRUPTED_TWICE, verdict
from tests.store.contract import job_row


@pytest.mark.parametrize(("kind", "scope", "state", "requeues", "on_restart", "expected"), [
    ("script", "local", "running", 0, "requeue", None),              # re-run once
    ("script", "federated", "running", 0, "requeue", None),          # at every site again
    ("script", "local", "running", 1, "requeue", INTERRUPTED_TWICE),  # not a third run
    ("script", "federated", "running", 1, "requeue", INTERRUPTED_TWICE),
    ("script", "local", "running", 0, "interrupt", INTERRUPTED),
    ("script", "local", "queued", 1, "interrupt", None),             # never ran: runs
    ("query", "local", "running", 0, "requeue", INTERRUPTED),         # researcher resubmits
    ("query", "federated", "queued", 0, "requeue", INTERRUPTED),
])
def test_an_unfinished_job_is_rerun_at_most_once(kind: str, scope: str, state: str,
                                                 requeues: int, on_restart: str,
                                                 expected: str | None) -> None:
    """A running script is re-run once under 'requeue', then interrupted for good, saying
    why; queries are interrupted; a queued script that never ran simply runs."""
    record = dataclasses.replace(job_row("j", kind=kind, scope=scope, state=state),
                                 requeues=requeues)
    assert verdict(record, on_restart) == expected


def test_a_peers_pending_request_is_not_resumed_here() -> None:
    """A row kept for another entry's request (origin: that node) is never run from here."""
    record = dataclasses.replace(job_row("j", kind="script", state="running"), origin="node-b")
    assert verdict(record, "requeue") == INTERRUPTED


def test_the_second_interruption_says_it_is_final() -> None:
    """The researcher reads that the job was interrupted twice and is not re-run again."""
    assert "interrupted twice" in INTERRUPTED_TWICE and "not re-run again" in INTERRUPTED_TWICE
