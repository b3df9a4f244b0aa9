"""Domain records → protobuf messages (the servicers' only vocabulary for replies)."""

from __future__ import annotations

from typing import Any

from stimnet.convert import signed_job, signed_job_pb, ts
from stimnet.query.fields import Grid
from stimnet.v1 import common_pb2, jobs_pb2, node_pb2
from stimnetd.store.records import JobRecord

__all__ = ["job", "signed_job", "signed_job_pb", "site_event", "ts"]


def site_event(ev: dict[str, Any]) -> common_pb2.SiteEvent:
    return common_pb2.SiteEvent(site=ev["site"], state=ev["state"], detail=ev.get("detail", ""),
                                n=max(0, int(ev.get("n", 0))), at=ts(ev.get("at", 0.0)))


def job(record: JobRecord) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=record.id, kind=record.kind, scope=record.scope, catalog=record.catalog,
        owner=record.owner, state=record.state, detail=record.detail,
        created_at=ts(record.created_at), updated_at=ts(record.updated_at),
        sites=[site_event(e) for e in record.sites], script_sha256=record.script_sha256,
        requeues=record.requeues)


def grid_pb(site: str, grid: Grid | None, error: str = "") -> node_pb2.SiteGrid:
    if grid is None:
        return node_pb2.SiteGrid(site=site, error=error)
    return node_pb2.SiteGrid(site=site, shape=list(grid.shape),
                             affine=[v for row in grid.affine for v in row],
                             space=grid.space, declared=grid.declared, error=error)


def grid_of(pb: node_pb2.SiteGrid) -> Grid:
    a = list(pb.affine)
    if len(pb.shape) != 3 or len(a) != 16:
        raise ValueError(f"site {pb.site!r} sent a malformed grid")
    return Grid(shape=tuple(pb.shape), affine=tuple(tuple(a[4 * r:4 * r + 4]) for r in range(4)),
                space=pb.space, declared=pb.declared)
