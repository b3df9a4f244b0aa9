"""Gossip membership on real daemons: convergence, failure detection, restarts, partitions."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest

from stimctl.client import AsyncClient
from stimnet.v1 import federation_pb2, federation_pb2_grpc
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.gossip.transport import PeerUnreachable
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

FAST = {"gossip_interval_s": 0.1, "probe_interval_s": 0.3, "probe_timeout_s": 0.15,
        "suspicion_mult": 2}
NAMES = [f"site-{c}" for c in "abcde"]


def _config(tmp: Path, pki: CertFactory, i: int, ports: list[int]) -> Path:
    name = NAMES[i]
    certs = pki.issue(name, "node")
    cat = _tiny_catalog(tmp / f"data-{name}", [float(a) for a in range(30, 45)])
    return write_node_config(tmp / name, certs, name, port=ports[i], catalogs=[cat],
                             crl=pki.crl_path, gossip=FAST,
                             federation={"seeds": [] if i == 0 else [f"127.0.0.1:{ports[0]}"]})


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _view(d: Daemon) -> dict[str, str]:
    return {m.name: m.status for m in d.membership.members()}


async def test_five_nodes_converge_from_one_seed_and_fan_out(tmp_path: Path, pki: CertFactory) -> None:
    """Five daemons that only know one seed learn each other, and fan-out reaches all of them."""
    ports = [free_port() for _ in NAMES]
    async with AsyncExitStack() as stack:
        daemons = []
        for i in range(5):
            d = Daemon(load_config(_config(tmp_path, pki, i, ports)))
            await d.start()
            stack.push_async_callback(d.shutdown)
            daemons.append(d)
        await _until(lambda: all(_view(d) == dict.fromkeys(NAMES, "alive") for d in daemons),
                     15, "full membership everywhere")
        # Steady state: probes succeed, so nobody is suspected and has to refute (which
        # would raise incarnations); a broken probe path shows up here.
        await asyncio.sleep(3)
        assert [_view(d) for d in daemons] == [dict.fromkeys(NAMES, "alive")] * len(daemons)
        assert max(m.incarnation for d in daemons for m in d.membership.members()) == 0
        alice = pki.issue("alice", "researcher")
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[3]}")) as c:
            peers = await c.peers()
            ans = await c.query("SELECT count(*) FROM tiny", federated=True, min_sites=5)
            federated = await c.catalogs(federated=True)
        assert sorted(p.name for p in peers) == NAMES
        assert ans.rows[0][0] == 75 and len(ans.manifest) == 5
        assert {x.site for x in federated if x.name == "tiny"} == set(NAMES)


class Partition:
    """Fault injection: calls from one side of the cut to the other fail as unreachable."""

    def __init__(self) -> None:
        self.blocked: set[tuple[str, str]] = set()

    def wrap(self, own: Callable[[], str]):  # type: ignore[no-untyped-def]
        part = self

        class Cut:
            def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
                self.inner = inner

            def _check(self, address: str) -> None:
                if (own(), address) in part.blocked:
                    raise PeerUnreachable(f"partitioned from {address}")

            async def ping(self, address, msg, timeout):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
                self._check(address)
                return await self.inner.ping(address, msg, timeout)

            async def ping_req(self, via, name, addr, msg, timeout):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
                self._check(via)
                return await self.inner.ping_req(via, name, addr, msg, timeout)

            async def push_pull(self, address, state, timeout):  # type: ignore[no-untyped-def]  # noqa: ASYNC109
                self._check(address)
                return await self.inner.push_pull(address, state, timeout)

        return Cut


async def test_partition_two_three_then_heal(tmp_path: Path, pki: CertFactory) -> None:
    """Cut 5 nodes into 2+3: each side marks the other unreachable; healed, all converge again."""
    ports = [free_port() for _ in NAMES]
    addr = [f"127.0.0.1:{p}" for p in ports]
    cut = Partition()
    async with AsyncExitStack() as stack:
        daemons = []
        for i in range(5):
            d = Daemon(load_config(_config(tmp_path, pki, i, ports)),
                       wrap_gossip_transport=cut.wrap(lambda i=i: addr[i]))
            await d.start()
            stack.push_async_callback(d.shutdown)
            daemons.append(d)
        await _until(lambda: all(_view(d) == dict.fromkeys(NAMES, "alive") for d in daemons),
                     15, "initial convergence")
        left, right = {0, 1}, {2, 3, 4}
        cut.blocked = {(addr[a], addr[b]) for a in left for b in right} | \
                      {(addr[b], addr[a]) for a in left for b in right}

        def other_side_down() -> bool:
            for i, d in enumerate(daemons):
                others = right if i in left else left
                v = _view(d)
                if any(v[NAMES[j]] not in ("suspect", "dead") for j in others):
                    return False
            return True

        await _until(other_side_down, 20, "each side to mark the other unreachable")
        cut.blocked = set()
        await _until(lambda: all(_view(d) == dict.fromkeys(NAMES, "alive") for d in daemons),
                     40, "convergence after healing")


async def test_forged_sender_and_nonsense_state_are_refused(start_node, pki: CertFactory) -> None:
    """A node claiming another's name is PERMISSION_DENIED and audited; nonsense is INVALID_ARGUMENT."""
    evil = pki.issue("evil", "node")
    async with start_node("site-a", gossip=FAST) as d:
        address = f"127.0.0.1:{d.port}"
        creds = client_config(evil, address).credentials()
        async with grpc.aio.secure_channel(address, creds) as ch:
            stub = federation_pb2_grpc.FederationServiceStub(ch)
            forged = federation_pb2.GossipMessage(sender="site-b", members=[
                federation_pb2.MemberState(name="site-b", address="127.0.0.1:1", incarnation=5,
                                           status="alive")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.PushPull(forged, timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "differs from the caller's certificate name 'evil'" in err.value.details()
            bad = federation_pb2.GossipMessage(sender="evil", members=[
                federation_pb2.MemberState(name="evil", address="127.0.0.1:1", incarnation=1,
                                           status="zombie")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.PushPull(bad, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            jump = federation_pb2.GossipMessage(sender="evil", members=[
                federation_pb2.MemberState(name="evil", address="127.0.0.1:1",
                                           incarnation=10**15, status="alive")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.PushPull(jump, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        alice = pki.issue("alice", "researcher")
        async with grpc.aio.secure_channel(address, client_config(alice, address).credentials()) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await federation_pb2_grpc.FederationServiceStub(ch).Ping(forged, timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        refused = [r for r in await d.store.audit_rows() if r.decision in ("refused", "denied")]
        assert [(r.actor, r.action, r.decision) for r in refused] == [
            ("evil", "/stimnet.v1.FederationService/PushPull", "refused")] * 3 + [
            ("alice", "/stimnet.v1.FederationService/Ping", "denied")]
        assert "site-b" not in {m.name for m in d.membership.members()}


async def _peer_views(ops, ports: list[int], skip: int) -> dict[str, dict[str, tuple[str, int]]]:  # type: ignore[no-untyped-def]
    """Each node's ListPeers answer: {node: {member: (status, incarnation)}}."""
    views = {}
    for i, port in enumerate(ports):
        if i == skip:
            continue
        async with AsyncClient(client_config(ops, f"127.0.0.1:{port}", 3)) as c:
            views[NAMES[i]] = {p.name: (p.status, p.incarnation) for p in await c.peers()}
    return views


async def test_killed_node_is_declared_dead_then_rejoins(tmp_path: Path, pki: CertFactory) -> None:
    """SIGKILL: dead everywhere at the incarnation it had; restarted: alive, higher
    incarnation. (Suspicion before death, within the protocol's bound, is pinned in virtual
    time by test_gossip_cluster; bench/gossip.py measures it on real processes.)"""
    ports = [free_port() for _ in NAMES]
    procs = [DaemonProcess(_config(tmp_path, pki, i, ports)) for i in range(5)]
    ops = pki.issue("ops", "admin")
    try:
        for p, port in zip(procs, ports, strict=True):
            await p.wait_healthy(ops, f"127.0.0.1:{port}")
        state: dict = {}

        async def converged() -> bool:
            state["v"] = await _peer_views(ops, ports, skip=-1)
            return all(set(v) == set(NAMES) and all(s == "alive" for s, _ in v.values())
                       for v in state["v"].values())

        deadline = time.monotonic() + 20
        while not await converged():
            assert time.monotonic() < deadline, f"no convergence: {state['v']}"
            await asyncio.sleep(0.2)
        before = state["v"]["site-a"]["site-e"][1]

        procs[4].proc.send_signal(signal.SIGKILL)
        procs[4].proc.wait()
        deadline = time.monotonic() + 20
        while True:
            views = await _peer_views(ops, ports, skip=4)
            if all(v["site-e"][0] == "dead" for v in views.values()):
                break
            assert time.monotonic() < deadline, f"not dead everywhere: {views}"
            await asyncio.sleep(0.05)
        # Declared by the others, not by itself: no one raised the dead node's incarnation.
        assert {name: v["site-e"] for name, v in views.items()} == {
            name: ("dead", before) for name in NAMES[:4]}

        procs[4] = DaemonProcess(_config_existing(tmp_path, 4))
        await procs[4].wait_healthy(ops, f"127.0.0.1:{ports[4]}")
        deadline = time.monotonic() + 20
        while True:
            views = await _peer_views(ops, ports, skip=-1)
            if all(v.get("site-e", ("", 0))[0] == "alive" and v["site-e"][1] > before
                   for v in views.values()):
                break
            assert time.monotonic() < deadline, f"not back everywhere: {views}"
            await asyncio.sleep(0.2)
    finally:
        for p in procs:
            p.kill()


def _config_existing(tmp: Path, i: int) -> Path:
    return tmp / NAMES[i] / "stimnetd.toml"
