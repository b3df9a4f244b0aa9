"""AdminService: audit verification and export (admin role only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from stimnet.v1 import admin_pb2, admin_pb2_grpc
from stimnetd.store import SiteStore


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: SiteStore) -> None:
        self._store = store

    async def VerifyAudit(self, request: admin_pb2.VerifyAuditRequest,
                          context: Any) -> admin_pb2.VerifyAuditResponse:
        v = await self._store.verify_audit()
        return admin_pb2.VerifyAuditResponse(ok=v.ok, entries=v.entries,
                                             first_bad_seq=v.first_bad_seq or 0, problem=v.problem)

    async def ExportAudit(self, request: admin_pb2.ExportAuditRequest,
                          context: Any) -> AsyncIterator[admin_pb2.AuditEntry]:
        for row in await self._store.audit_rows(since=request.since):
            yield admin_pb2.AuditEntry(
                seq=row.seq, at=row.at, actor=row.actor, role=row.role, action=row.action,
                decision=row.decision, detail_json=row.detail_json, prev_hash=row.prev_hash,
                hash=row.hash)
