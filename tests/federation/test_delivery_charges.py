"""A peer's budget charge is tied to delivery (docs/privacy.md, "Charged only for what
left the site"): an entry that cannot keep the job does not fan it out, a charge whose
partial never left the site is refunded, and one whose bytes left it never is."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from stimctl.client import AsyncClient
from stimnet import signing
from stimnet.errors import JobFailed, StorageFull
from stimnet.query.spec import QuerySpec
from stimnet.v1 import federation_pb2, federation_pb2_grpc
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.rpc import convert
from stimnetd.testing import CertFactory, CertPaths, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config, fill_volume

NO_SPACE = "no space left on the state volume"
QUERY = "SELECT count(*), avg(age) FROM tiny"
PRIVACY = {"dp": "required", "budget_epsilon": 1e6, "max_epsilon_per_query": 1.0,
           "catalog_budget_epsilon": 1e6}


@asynccontextmanager
async def _sites(tmp: Path, pki: CertFactory, entry_state: Path | None = None,
                 n: int = 3, privacy: dict | None = None,
                 subjob_timeout_s: float = 10.0) -> AsyncIterator[list[Daemon]]:
    """`n` in-process daemons on loopback, static peers of each other; the first (the
    entry) keeps its state in `entry_state` when given, with no free-space floor."""
    ports = [free_port() for _ in range(n)]
    async with AsyncExitStack() as stack:
        daemons = []
        for i in range(n):
            name = f"delivery-{'abc'[i]}"
            cat = _tiny_catalog(tmp / f"data-{name}", [float(30 + a % 40) for a in range(400)])
            node = {"state_dir": str(entry_state)} if i == 0 and entry_state else {}
            storage = {"min_free_mb": 0} if i == 0 and entry_state else {}
            path = write_node_config(
                tmp / name, pki.issue(name, "node"), name, port=ports[i], catalogs=[cat],
                crl=pki.crl_path, gossip={"enabled": False}, node=node, storage=storage,
                federation={"peers": [f"127.0.0.1:{p}" for p in ports if p != ports[i]],
                            "subjob_timeout_s": subjob_timeout_s},
                privacy={**PRIVACY, **(privacy or {})})
            d = Daemon(load_config(path))
            await d.start()
            stack.push_async_callback(d.shutdown)
            daemons.append(d)
        yield daemons


async def _charges(d: Daemon, researcher: str = "alice") -> int:
    """The ε charges `d`'s ledger holds for `researcher` that were not refunded."""
    rows = await d.store.db.execute_fetchall(
        "SELECT COUNT(*) FROM ledger WHERE researcher = ? AND epsilon > 0"
        " AND refunded_at IS NULL", (researcher,))
    return int(list(rows)[0][0])


async def test_a_full_entry_fans_nothing_out_and_no_peer_charges(tmp_path: Path, pki: CertFactory,
                                                                 small_volume: Path) -> None:
    """With the entry's state volume full, federated queries are refused there with "no
    space left on the state volume" before any peer is asked: the peers' ledgers hold a
    charge for each answer delivered and for nothing else; once space is freed, queries
    are answered (and charged) again."""
    alice, ops = pki.issue("alice", "researcher"), pki.issue("ops", "admin")
    async with _sites(tmp_path, pki, small_volume / "state") as sites:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{sites[0].port}", 20.0)) as c, \
                AsyncClient(client_config(ops, f"127.0.0.1:{sites[0].port}", 20.0)) as admin:
            delivered = {d.config.node.name: 0 for d in sites[1:]}

            async def ask() -> None:
                ans = await c.query(QUERY, federated=True, epsilon=1.0)
                for m in ans.manifest:
                    if m["state"] == "done" and m["site"] in delivered:
                        delivered[m["site"]] += 1
            await ask()
            filler = fill_volume(small_volume)
            try:
                for _ in range(6):
                    with pytest.raises((StorageFull, JobFailed), match=NO_SPACE):
                        await ask()
                charges = {d.config.node.name: await _charges(d) for d in sites[1:]}
                print(f"\nfull entry: 6 queries failed; peer charges {charges}, "
                      f"answers delivered {delivered}")
                assert charges == delivered == {"delivery-b": 1, "delivery-c": 1}
                assert (await admin.status()).name == "delivery-a"
                assert (await admin.audit_verify()).ok
            finally:
                filler.unlink()
            await ask()
            assert {d.config.node.name: await _charges(d) for d in sites[1:]} \
                == delivered == {"delivery-b": 2, "delivery-c": 2}


async def test_under_load_a_nearly_full_entry_charges_peers_only_for_delivered_answers(
        tmp_path: Path, pki: CertFactory, small_volume: Path) -> None:
    """60 federated queries, 8 at a time, at an entry left 2.5 MiB of free space: some are
    answered, the rest refused for space at the entry; each peer's ledger holds exactly
    one charge per answer it delivered. (Before the entry's pre-fan-out check, jobs that
    failed at the entry after their peers had answered cost each peer a charge.)"""
    alice = pki.issue("alice", "researcher")
    async with _sites(tmp_path, pki, small_volume / "state") as sites:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{sites[0].port}", 20.0)) as c:
            delivered = {d.config.node.name: 0 for d in sites[1:]}
            refused: list[str] = []
            room = asyncio.Semaphore(8)

            async def ask() -> None:
                async with room:
                    try:
                        ans = await c.query(QUERY, federated=True, epsilon=1.0)
                    except (StorageFull, JobFailed) as exc:
                        refused.append(str(exc))
                        return
                for m in ans.manifest:
                    if m["state"] == "done" and m["site"] in delivered:
                        delivered[m["site"]] += 1
            filler = fill_volume(small_volume, leave=2560 * 1024)
            try:
                await asyncio.gather(*(ask() for _ in range(60)))
            finally:
                filler.unlink()
            charges = {d.config.node.name: await _charges(d) for d in sites[1:]}
            print(f"\nnearly full entry, 60 queries: {60 - len(refused)} answered, "
                  f"{len(refused)} refused; peer charges {charges}, delivered {delivered}")
            assert refused and all(NO_SPACE in r for r in refused)
            assert charges == delivered
            assert set(delivered.values()) == {60 - len(refused)}


SPEC = QuerySpec.from_dict({
    "catalog": "tiny", "where": None, "group_by": [],
    "aggregates": [{"func": "count", "fields": [], "name": "n", "params": []}]}).to_dict()


def _signed(c: AsyncClient, epsilon: float = 1.0) -> signing.SignedJob:
    """A federated ε query signed by `c`'s researcher to enter at delivery-a."""
    return c.sign(signing.new_request("query", "tiny", spec=SPEC, entry="delivery-a",
                                      scope="federated", epsilon=epsilon))


def _entry_stub(tmp: Path, peer: Daemon) -> tuple[grpc.aio.Channel, Any]:
    """A channel to `peer` with delivery-a's node certificate: an entry the test plays,
    honest or not."""
    d = tmp / "pki" / "node-delivery-a"
    certs = CertPaths(cert=d / "delivery-a.crt", key=d / "delivery-a.key", ca=d / "ca.crt")
    address = f"127.0.0.1:{peer.port}"
    channel = grpc.aio.secure_channel(address, client_config(certs, address).credentials())
    return channel, federation_pb2_grpc.FederationServiceStub(channel)


def _subjob(stub: Any, signed: signing.SignedJob) -> Any:
    return stub.RunSubJob(federation_pb2.SubJobRequest(job=convert.signed_job_pb(signed)),
                          timeout=30)


def _hold_after_release(monkeypatch: pytest.MonkeyPatch, peer: Daemon) -> asyncio.Event:
    """Make `peer`'s shares wait, after their release is charged and before their outcome
    goes to the stream, until the returned event is set (a share slow to hand its
    answer over: its charge is pending meanwhile)."""
    go = asyncio.Event()
    run = peer.site.run

    async def held(*args: Any, **kwargs: Any) -> Any:
        outcome = await run(*args, **kwargs)
        await go.wait()
        return outcome
    monkeypatch.setattr(peer.site, "run", held)
    return go


async def _until(check: Any, what: str) -> None:
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def _refunds(d: Daemon) -> list[dict]:
    return [json.loads(e.detail_json) for e in await d.store.audit_rows()
            if e.action == "release" and e.decision == "refunded"]


async def test_an_entry_that_drops_the_stream_after_the_partial_gets_no_refund(
        tmp_path: Path, pki: CertFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A malicious entry reads a peer's partial and drops the stream without waiting for
    anything further: the charge stands. Only a sub-job that ends before the peer handed
    any of its partial to the stream is refunded, audited, and the audit chain verifies."""
    alice = pki.issue("alice", "researcher")
    async with _sites(tmp_path, pki, n=2) as (entry, peer), \
            AsyncClient(client_config(alice, f"127.0.0.1:{entry.port}", 20.0)) as c:
        channel, stub = _entry_stub(tmp_path, peer)
        async with channel:
            taken = _subjob(stub, _signed(c))
            async for ev in taken:
                if ev.HasField("partial"):  # the first of the answer's bytes are here
                    taken.cancel()  # dropped at once: "never delivered"
                    break
            go = _hold_after_release(monkeypatch, peer)
            unsent = _subjob(stub, _signed(c))
            reading = asyncio.create_task(_drain(unsent))
            await _until(lambda: _two(peer), "the second sub-job's charge (pending)")
            unsent.cancel()  # the entry "reports failure" before any byte of the partial
            await _until(lambda: _refunded_one(peer), "the unsent partial's refund")
            go.set()
            assert await reading == "CANCELLED"
        assert await _charges(peer) == 1  # the dropped-after-delivery one
        (refund,) = await _refunds(peer)
        assert refund["epsilon"] == 1.0 and "ended before this site sent" in refund["reason"]
        assert (await peer.store.verify_audit()).ok


async def _drain(call: Any) -> str:
    """Read `call` to its end: how it ended (a status code name)."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except asyncio.CancelledError:
        return "CANCELLED"
    return "OK"


async def _two(d: Daemon) -> bool:
    return await _charges(d) == 2


async def _refunded_one(d: Daemon) -> bool:
    return len(await _refunds(d)) == 1


async def test_a_pending_charge_counts_against_the_budget_at_admission(
        tmp_path: Path, pki: CertFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A charge counts from its release's commit, while its partial is still on the way
    (pending): a concurrent request that the budget would only cover without it is refused
    at admission, naming the budget. Once the pending charge is refunded (its sub-job
    ended before any byte was sent), the budget is there again."""
    alice = pki.issue("alice", "researcher")
    async with _sites(tmp_path, pki, n=2, privacy={"budget_epsilon": 1.5}) as (entry, peer), \
            AsyncClient(client_config(alice, f"127.0.0.1:{entry.port}", 20.0)) as c:
        channel, stub = _entry_stub(tmp_path, peer)
        async with channel:
            go = _hold_after_release(monkeypatch, peer)
            pending = _subjob(stub, _signed(c))
            reading = asyncio.create_task(_drain(pending))
            await _until(lambda: _one(peer), "the first sub-job's charge (pending)")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in _subjob(stub, _signed(c)):
                    pass
            assert "budget" in (refused.value.details() or ""), refused.value.details()
            assert await _charges(peer) == 1
            pending.cancel()
            assert await reading == "CANCELLED"
            await _until(lambda: _refunded_one(peer), "the pending charge's refund")
            go.set()
            states = [ev.site.state async for ev in _subjob(stub, _signed(c))
                      if ev.HasField("site")]
            assert states[-1] == "done"
        assert await _charges(peer) == 1
        assert (await peer.store.verify_audit()).ok


async def _one(d: Daemon) -> bool:
    return await _charges(d) == 1


async def test_a_concurrent_copy_of_a_delivered_job_cannot_refund_its_charge(
        tmp_path: Path, pki: CertFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A malicious entry relays two copies of one signed job at once, so that both are
    admitted before either releases: one is answered (and charged), the other is refused
    as a replay by the release transaction and ends without an outcome. Ending unsent, the
    copy must not refund the charge its twin's answer carried."""
    alice = pki.issue("alice", "researcher")
    async with _sites(tmp_path, pki, n=2) as (entry, peer), \
            AsyncClient(client_config(alice, f"127.0.0.1:{entry.port}", 20.0)) as c:
        go = asyncio.Event()
        compute = peer.site._compute

        async def gated(*args: Any, **kwargs: Any) -> Any:
            await go.wait()
            return await compute(*args, **kwargs)
        monkeypatch.setattr(peer.site, "_compute", gated)
        channel, stub = _entry_stub(tmp_path, peer)
        async with channel:
            signed = _signed(c)
            copies = [_subjob(stub, signed) for _ in range(2)]
            ends = [asyncio.create_task(_states(call)) for call in copies]

            async def both_admitted() -> bool:
                return sum(peer.subjobs._running.values()) == 2
            await _until(both_admitted, "both copies admitted")
            go.set()
            results = sorted([await e for e in ends])
        assert results == [["FAILED_PRECONDITION: replayed request: this signed job was "
                             "already run at this site"], ["done"]], results
        assert await _charges(peer) == 1
        assert await _refunds(peer) == []


async def _states(call: Any) -> list[str]:
    """A sub-job's terminal states, or its status as 'CODE: details'."""
    try:
        return [ev.site.state async for ev in call
                if ev.HasField("site") and ev.site.state not in ("accepted", "running")]
    except grpc.aio.AioRpcError as exc:
        return [f"{exc.code().name}: {exc.details()}"]


async def test_a_job_cancelled_at_the_entry_refunds_the_peers_unsent_charge(
        tmp_path: Path, pki: CertFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The honest path, on the shared SubJobs stream: a researcher cancels a federated
    query while a peer's released share has not been handed to the stream; the entry
    cancels the sub-job and the peer refunds its charge, audited."""
    alice = pki.issue("alice", "researcher")
    async with _sites(tmp_path, pki, n=2) as (entry, peer), \
            AsyncClient(client_config(alice, f"127.0.0.1:{entry.port}", 20.0)) as c:
        go = _hold_after_release(monkeypatch, peer)
        job = await c.submit_query(QUERY, federated=True, epsilon=1.0)
        await _until(lambda: _one(peer), "the peer's charge (pending)")
        cancelled = await c.cancel(job.id)
        assert cancelled.state == "cancelled"
        await _until(lambda: _refunded_one(peer), "the peer's refund")
        go.set()
        assert await _charges(peer) == 0
        (refund,) = await _refunds(peer)
        assert refund["job"] == job.id and "delivery-a" in refund["reason"]
        assert (await peer.store.verify_audit()).ok


async def test_an_entry_that_cannot_record_the_job_cancels_its_peers_unsent_shares(
        tmp_path: Path, pki: CertFactory, small_volume: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The space check is not a reservation: here it is passed (as if the volume filled
    just after it) and the job's row then fails to be written, while the peer's share is
    out (held after its release, unsent). The entry fails the job saying why at once and
    cancels the sub-jobs still out: the peer ends holding no charge (refunded if it had
    released, never charged if the cancel came first), not charged for a job that
    failed. Without the cancel, the job would wait for the held share."""
    alice = pki.issue("alice", "researcher")
    # A sub-job deadline well beyond the test's waits: the job must end by the entry's
    # cancel, not by the peer's deadline passing.
    async with _sites(tmp_path, pki, small_volume / "state", n=2, subjob_timeout_s=60.0) \
            as (entry, peer), \
            AsyncClient(client_config(alice, f"127.0.0.1:{entry.port}", 90.0)) as c:
        async def passes(researcher: str) -> None:
            return None
        monkeypatch.setattr(entry.site, "check_storage", passes)
        go = _hold_after_release(monkeypatch, peer)
        filler = fill_volume(small_volume)
        try:
            asked = asyncio.create_task(c.query(QUERY, federated=True, epsilon=1.0))

            async def ended() -> bool:
                return asked.done()
            await _until(ended, "the job's end")
            with pytest.raises(JobFailed, match=NO_SPACE):
                await asked

            async def peer_idle() -> bool:
                return not peer.subjobs._running
            await _until(peer_idle, "the peer's sub-job's end")
        finally:
            go.set()
            filler.unlink()
        assert await _charges(peer) == 0
        assert len(await _refunds(peer)) <= 1
        assert (await peer.store.verify_audit()).ok
