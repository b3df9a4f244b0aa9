"""Domain records → protobuf messages (the servicers' only vocabulary for replies)."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from stimnet.v1 import common_pb2, jobs_pb2
from stimnetd.jobs.signing import SignedJob
from stimnetd.store.records import JobRecord


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def site_event(ev: dict[str, Any]) -> common_pb2.SiteEvent:
    return common_pb2.SiteEvent(site=ev["site"], state=ev["state"], detail=ev.get("detail", ""),
                                n=max(0, int(ev.get("n", 0))), at=ts(ev.get("at", 0.0)))


def job(record: JobRecord) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=record.id, kind=record.kind, scope=record.scope, catalog=record.catalog,
        owner=record.owner, state=record.state, detail=record.detail,
        created_at=ts(record.created_at), updated_at=ts(record.updated_at),
        sites=[site_event(e) for e in record.sites], script_sha256=record.script_sha256)


def signed_job(msg: common_pb2.SignedJob) -> SignedJob:
    return SignedJob(payload=bytes(msg.payload), signature=bytes(msg.signature),
                     signer_cert_pem=bytes(msg.signer_cert_pem), script=bytes(msg.script))


def signed_job_pb(job: SignedJob) -> common_pb2.SignedJob:
    return common_pb2.SignedJob(payload=job.payload, signature=job.signature,
                                signer_cert_pem=job.signer_cert_pem, script=job.script)
