"""The store contract: the verbs the daemon uses, which both stores implement with one
meaning (db.Store on SQLite, pg.PgStore on PostgreSQL; tests/store runs one body against
each). Callers are typed with `SiteStore`, never with either implementation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from stimnetd.store.audit import AuditRow, AuditVerification
from stimnetd.store.records import JobRecord, MemberRecord, NonceClaim, Release, ReleaseRule
from stimnetd.store.transaction import AuditEntry


class SiteStore(Protocol):
    @property
    def where(self) -> str:
        """The store as an operator would name it (a path, or a URL without password)."""

    @property
    def state_dir(self) -> Path | None:
        """This process's state directory (its lock, the store identity)."""

    @property
    def out_of_space(self) -> bool:
        """The last write failed for want of space, and none has committed since."""

    async def open(self, *, integrity_check: bool = True, lock_dir: bool = False,
                   check_identity: bool = False) -> None: ...

    async def close(self) -> None: ...

    async def keep_identity(self, *, replace: bool = False) -> None: ...

    async def backup(self, dest: Path) -> None: ...

    # -- audit chain
    async def audit(self, actor: str, role: str, action: str, decision: str,
                    detail: dict[str, Any] | None = None) -> int: ...

    def audit_soon(self, actor: str, role: str, action: str, decision: str,
                   detail: dict[str, Any] | None = None) -> None: ...

    async def flush(self) -> None: ...

    async def audit_rows(self, since: float = 0.0) -> list[AuditRow]: ...

    async def verify_audit(self) -> AuditVerification: ...

    # -- signed-request nonces
    async def claim_nonce(self, claim: NonceClaim, audit: AuditEntry | None = None) -> bool: ...

    async def remember_nonce(self, nonce: str, signer: str, max_age_s: float, *,
                             audit: AuditEntry | None = None) -> bool: ...

    def nonce_seen(self, nonce: str) -> bool: ...

    async def nonce_seen_now(self, nonce: str) -> bool: ...

    # -- jobs
    async def create_job(self, job: JobRecord, *, audit: tuple[str, str, str] | None = None,
                         nonce: tuple[str, float] | None = None, durable: bool = True,
                         pending_limit: int | None = None, defer: bool = False) -> bool: ...

    async def update_job(self, job_id: str, *, state: str | None = None,
                         detail: str | None = None, sites: list[dict[str, Any]] | None = None,
                         result: bytes | None = None, bump_attempts: bool = False,
                         bump_requeues: bool = False, durable: bool = True,
                         defer: bool = False) -> JobRecord: ...

    async def update_job_if(self, job_id: str, expect_state: str | None, *,
                            state: str | None = None, detail: str | None = None,
                            sites: list[dict[str, Any]] | None = None,
                            result: bytes | None = None, bump_attempts: bool = False,
                            bump_requeues: bool = False, durable: bool = True,
                            defer: bool = False) -> JobRecord | None: ...

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def list_jobs(self, *, owner: str | None = None, states: Iterable[str] | None = None,
                        limit: int = 100) -> list[JobRecord]: ...

    async def prune_jobs(self, finished_before: float, *, batch: int = 1000) -> int: ...

    async def count_jobs_by_state(self) -> dict[str, int]: ...

    # -- releases and the privacy ledger
    async def spent(self, researcher: str, catalog: str) -> float: ...

    async def spent_delta(self, researcher: str, catalog: str) -> float: ...

    async def spent_by_catalog(self) -> dict[str, float]: ...

    async def release(self, release: Release, *, decide: ReleaseRule,
                      audit_actor: tuple[str, str], nonce: NonceClaim | None = None
                      ) -> Release: ...

    async def get_release(self, job_id: str) -> Release | None: ...

    async def refund(self, job_id: str, *, audit_actor: tuple[str, str], reason: str
                     ) -> float: ...

    async def stored_bytes(self, researcher: str) -> int: ...

    # -- the site's own state
    async def load_members(self) -> list[MemberRecord]: ...

    async def save_members(self, members: Iterable[MemberRecord]) -> None: ...

    async def approve_script(self, sha256: str, by: str) -> None: ...

    async def is_script_approved(self, sha256: str) -> bool: ...

    async def site_secret(self) -> bytes: ...

    async def installation_id(self) -> str: ...


@runtime_checkable
class SharedQueue(Protocol):
    """What only a store shared by replicas has: a queued job runs on exactly one of them,
    which holds it under a lease it renews (pg_jobs.py)."""

    async def claim_job(self, job_id: str, replica: str, lease_s: float,
                        detail: str = "") -> JobRecord | None: ...

    async def renew_lease(self, job_id: str, replica: str, lease_s: float) -> bool: ...

    async def recover_expired(self, on_restart: str, *, by: str) -> list[str]: ...

    async def claim_queued(self, replica: str, lease_s: float) -> JobRecord | None: ...
