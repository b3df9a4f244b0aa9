"""Signed researcher jobs: an entry node can neither forge, alter nor replay them."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import grpc
import pytest

from stimctl.client import NotAuthenticated, PermissionDenied, Refused
from stimnet import signing
from stimnet.v1 import federation_pb2, federation_pb2_grpc
from stimnetd.rpc import convert
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

SQL = {"catalog": "tiny", "where": None, "group_by": [],
       "aggregates": [{"func": "count", "fields": [], "name": "n", "params": []}]}


def _signed(client, entry: str = "site-a", **changes) -> signing.SignedJob:  # type: ignore[no-untyped-def]
    """A query signed by `client`'s researcher for `entry` (the federation's first node,
    which `fed.client()` talks to)."""
    from stimnet.query.spec import QuerySpec

    spec = QuerySpec.from_dict(SQL).to_dict()
    req = signing.new_request("query", "tiny", spec=spec, entry=entry, **changes)
    return client.sign(req)


def _tamper(signed: signing.SignedJob, **changes) -> signing.SignedJob:  # type: ignore[no-untyped-def]
    doc = json.loads(signed.payload)
    doc.update(changes)
    return dataclasses.replace(signed, payload=signing.canonical(doc))


async def _subjob(fed, entry: int, peer: int, signed: signing.SignedJob,  # type: ignore[no-untyped-def]
                  request_id: str = "") -> list:
    """Call RunSubJob on `peer` with `entry`'s node certificate (a relay, possibly malicious)."""
    name = f"site-{chr(ord('a') + entry)}"
    d = fed.tmp / "pki" / f"node-{name}"
    from stimnetd.testing import CertPaths

    certs = CertPaths(cert=d / f"{name}.crt", key=d / f"{name}.key", ca=d / "ca.crt")
    creds = client_config(certs, fed.address(peer)).credentials()
    async with grpc.aio.secure_channel(fed.address(peer), creds) as ch:
        stub = federation_pb2_grpc.FederationServiceStub(ch)
        call = stub.RunSubJob(federation_pb2.SubJobRequest(job=convert.signed_job_pb(signed),
                                                           request_id=request_id), timeout=10)
        return [ev async for ev in call]


async def test_replayed_submission_is_refused(federation, tmp_path: Path) -> None:
    """Submitting the same signed job twice: the second is refused as a replay."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]]) as fed, fed.client() as c:
        signed = _signed(c)
        await c.submit(signed)
        with pytest.raises(Refused, match="replayed request"):
            await c.submit(signed)


async def test_tampered_submission_is_refused(federation, tmp_path: Path) -> None:
    """A payload altered after signing (epsilon, catalog or spec) fails signature verification."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]]) as fed, fed.client() as c:
        with pytest.raises(NotAuthenticated, match="signature does not match"):
            await c.submit(_tamper(_signed(c), epsilon=None, min_sites=2))


async def test_stale_request_is_refused(federation, tmp_path: Path) -> None:
    """A job signed longer ago than request_max_age_s is refused as stale, and one from
    the future too; each says by how much and that a clock may be wrong."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]]) as fed, fed.client() as c:
        with pytest.raises(NotAuthenticated, match=r"stale: issued 3(60\d|599)s ago by this site's "
                                                   r"clock, limit 300s.*clock"):
            await c.submit(_signed(c, now=time.time() - 3600))
        with pytest.raises(NotAuthenticated, match=r"issued 3(59\d|600)s in the future by this "
                                                   r"site's clock, beyond the allowed skew of "
                                                   r"300s"):
            await c.submit(_signed(c, now=time.time() + 3600))


async def test_job_signed_by_someone_else_is_refused(federation, tmp_path: Path) -> None:
    """Bob cannot submit a job Alice signed (budget and audit belong to the signer)."""
    cat = _tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])
    async with federation([[cat]]) as fed, fed.client(who="alice") as alice, \
            fed.client(who="bob") as bob:
        with pytest.raises(PermissionDenied, match="signed by researcher/alice but submitted by"):
            await bob.submit(_signed(alice))


async def test_peer_refuses_relayed_replay_and_tampering(federation, tmp_path: Path) -> None:
    """A (malicious) entry node re-sending or altering a researcher's job is refused by the peer."""
    cats = [[_tiny_catalog(tmp_path / "a", [float(a) for a in range(30, 60)])],
            [_tiny_catalog(tmp_path / "b", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        signed = _signed(c, scope="federated")
        job = await c.submit(signed)
        await c.run_job(job)
        # Replaying the relayed job to site-b directly:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _subjob(fed, 0, 1, signed)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "replayed" in err.value.details()
        # Altering a fresh one (raising epsilon, dropping the filter) before relaying:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _subjob(fed, 0, 1, _tamper(_signed(c, scope="federated"), epsilon=5.0))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Forging a job with the entry node's own key (a node is not a researcher):
        forged = _signed(c, scope="federated")
        node_key = (fed.tmp / "pki" / "node-site-a" / "site-a.key").read_bytes()
        node_cert = (fed.tmp / "pki" / "node-site-a" / "site-a.crt").read_bytes()
        forged = signing.sign(signing.JobRequest.from_payload(forged.payload), node_key, node_cert)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _subjob(fed, 0, 1, forged)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "must be signed by a researcher" in err.value.details()


async def test_a_job_is_answered_only_through_the_entry_node_it_was_signed_for(
        federation, tmp_path: Path) -> None:
    """The signed payload names the entry node. A node that sees a researcher's job (one
    it was relayed) cannot take it to other sites — they refuse it from anyone but that
    entry, before remembering its nonce, so the real request is not made a "replay" — and
    no node runs a job signed for another entry."""
    cats = [[_tiny_catalog(tmp_path / "a", [float(a) for a in range(30, 60)])],
            [_tiny_catalog(tmp_path / "b", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c, fed.client(1) as at_b:
        assert await c.entry_node() == "site-a" and await at_b.entry_node() == "site-b"
        signed = _signed(c, scope="federated")  # for site-a
        # site-b relays it to site-a, racing site-a's own fan-out:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _subjob(fed, 1, 0, signed)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "signed to enter the federation at node 'site-a', not 'site-b'" in \
            err.value.details()
        # ... or the researcher's copy is submitted to site-b (the payload says site-a):
        with pytest.raises(PermissionDenied, match="signed for entry node 'site-a', but this "
                                                   "node is 'site-b'"):
            await at_b.submit(signed)
        # Rewriting `entry` breaks the signature:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _subjob(fed, 1, 0, _tamper(signed, entry="site-b"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The refusals consumed nothing: through site-a the same job runs at both sites.
        answer = await c.run_job(await c.submit(signed))
        assert {m["site"]: m["state"] for m in answer.manifest} == \
            {"site-a": "done", "site-b": "done"}


async def test_concurrent_relayed_copies_release_once(federation, tmp_path: Path) -> None:
    """A peer remembers a query's nonce in its release transaction (one commit per query):
    of several copies relayed at once, exactly one is released, the others are replays."""
    import asyncio

    cats = [[_tiny_catalog(tmp_path / "a", [float(a) for a in range(30, 60)])],
            [_tiny_catalog(tmp_path / "b", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        signed = _signed(c, scope="federated")
        results = await asyncio.gather(*[_subjob(fed, 0, 1, signed) for _ in range(4)],
                                       return_exceptions=True)
        done = [r for r in results if not isinstance(r, BaseException)]
        replays = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(done) == 1 and len(replays) == 3, results
        assert [(r.code(), "replayed" in (r.details() or "")) for r in replays] == [
            (grpc.StatusCode.FAILED_PRECONDITION, True)] * 3
        assert done[0][-1].site.state == "done"
        peer = fed.daemons[1]
        rows = await peer.store.audit_rows()
        job_id = signing.JobRequest.from_payload(signed.payload).job_id
        mine = [r for r in rows if json.loads(r.detail_json).get("job") == job_id]
        assert [(r.action, r.decision) for r in mine] == [("subjob", "accepted"),
                                                          ("release", "released")]


async def test_revoked_signer_is_refused_even_after_its_chain_was_cached(federation,
                                                                         tmp_path: Path) -> None:
    """A researcher revoked after earlier jobs (chain cached) cannot have new jobs relayed."""
    cats = [[_tiny_catalog(tmp_path / "a", [float(a) for a in range(30, 60)])],
            [_tiny_catalog(tmp_path / "b", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        await c.run_job(await c.submit(_signed(c, scope="federated")))
        pending = _signed(c, scope="federated")  # signed before the revocation
        fed.pki.revoke("alice")
        for d in fed.daemons:
            d.reload()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _subjob(fed, 0, 1, pending)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in err.value.details()


async def test_an_entrys_request_id_is_bounded_in_the_peers_audit(federation,
                                                                  tmp_path: Path) -> None:
    """The request id an entry puts in a sub-job lands in the peer's audit log: a relay
    cannot make it 100,000 characters (the guard bounds the one in metadata the same way)."""
    cats = [[_tiny_catalog(tmp_path / f"t{i}", [float(a) for a in range(30, 60)])] for i in (0, 1)]
    async with federation(cats) as fed, fed.client() as c:
        events = await _subjob(fed, 0, 1, _signed(c, scope="federated"),
                               request_id="r" * 100_000)
        rows = [r for r in await fed.daemons[1].store.audit_rows() if r.action == "subjob"]
    assert events[-1].site.state == "done"
    assert [json.loads(r.detail_json)["request_id"] for r in rows] == ["r" * 64]


async def test_a_local_job_relayed_to_a_peer_is_refused(federation, tmp_path: Path) -> None:
    """A job the researcher signed for one node (scope local): that node relaying it to
    its peers would spend the researcher's budget there and collect answers nobody asked
    for. The peer refuses it before anything runs, and releases nothing."""
    cats = [[_tiny_catalog(tmp_path / f"t{i}", [float(a) for a in range(30, 60)])] for i in (0, 1)]
    async with federation(cats) as fed, fed.client() as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _subjob(fed, 0, 1, _signed(c, scope="local", epsilon=None))
        rows = await fed.daemons[1].store.audit_rows()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "signed for scope 'local'" in (err.value.details() or "")
    assert "release" not in [r.action for r in rows]
