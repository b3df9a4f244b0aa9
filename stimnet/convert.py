"""Wire values both sides build: signed jobs and timestamps as protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from stimnet.signing import SignedJob
from stimnet.v1 import common_pb2


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def signed_job(msg: common_pb2.SignedJob) -> SignedJob:
    return SignedJob(payload=bytes(msg.payload), signature=bytes(msg.signature),
                     signer_cert_pem=bytes(msg.signer_cert_pem), script=bytes(msg.script))


def signed_job_pb(job: SignedJob) -> common_pb2.SignedJob:
    return common_pb2.SignedJob(payload=job.payload, signature=job.signature,
                                signer_cert_pem=job.signer_cert_pem, script=job.script)
