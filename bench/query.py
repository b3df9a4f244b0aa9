"""Federated query throughput and latency vs a bare mTLS fan-out of the same shape.

From one run, on loopback:
1. sequential federated queries/s and p50 latency: client → entry → 3 stimnetd daemons on
   the CNSIM catalog (DP off);
2. the same for a bare grpc.aio mTLS fan-out: client → entry → 3 peers, empty handlers,
   unary calls (the baseline of the goal), measured in turns of 25 queries with (1), so
   that a busy spell of the shared machine weighs on both alike;
3. their ratio; and, for information, the bare fan-out again with server-streaming calls
   at both hops (the call type of StimNet's RunJob and RunSubJob; its queries and their
   sub-jobs go on multiplexed streams, see stimnetd/rpc/multiplex.py);
4. latency of an entry whose 16 peers each add a fixed 200 ms, divided by the same with 1
   such peer (parallel fan-out keeps this near 1).
Goals: ≥ 100 queries/s, latency ≤ 3× bare, 16-peer/1-peer ≤ 1.25.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, percentile, workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient
from stimnetd.testing import CertFactory, CertPaths, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config

sys.path.insert(0, str(ROOT))
from tests.federation.conftest import cnsim_catalog  # noqa: E402

BARE = r'''
import asyncio, sys, grpc
role, port, key, cert, ca, delay = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6], float(sys.argv[6])
peers = sys.argv[7:]
async def main():
    creds_s = grpc.ssl_server_credentials([(open(key,'rb').read(), open(cert,'rb').read())],
                                          root_certificates=open(ca,'rb').read(), require_client_auth=True)
    rd = lambda p: open(p, 'rb').read()
    creds_c = grpc.ssl_channel_credentials(rd(ca), rd(key), rd(cert))
    chans = [grpc.aio.secure_channel(p, creds_c) for p in peers]
    calls = [c.unary_unary("/bench.Peer/Run") for c in chans]
    streams = [c.unary_stream("/bench.Peer/RunStream") for c in chans]
    async def peer(req, ctx):
        if delay: await asyncio.sleep(delay)
        return b""
    async def peer_stream(req, ctx):
        yield b""
    async def entry(req, ctx):
        await asyncio.gather(*[c(req, timeout=10) for c in calls])
        return b""
    async def drain(call):
        async for _ in call: pass
    async def entry_stream(req, ctx):
        await asyncio.gather(*[drain(c(req, timeout=10)) for c in streams])
        yield b""
    h = grpc.method_handlers_generic_handler("bench.Peer" if role == "peer" else "bench.Entry", {
        "Run": grpc.unary_unary_rpc_method_handler(peer if role == "peer" else entry),
        "RunStream": grpc.unary_stream_rpc_method_handler(
            peer_stream if role == "peer" else entry_stream)})
    s = grpc.aio.server(); s.add_generic_rpc_handlers((h,))
    s.add_secure_port(f"127.0.0.1:{port}", creds_s); await s.start(); print("ready", flush=True)
    await s.wait_for_termination()
asyncio.run(main())
'''

FAKE_PEER = r'''
import asyncio, sys, grpc
sys.path.insert(0, sys.argv[6])
from stimnet.v1 import common_pb2, federation_pb2, federation_pb2_grpc
port, key, cert, ca, delay, name = int(sys.argv[1]), *sys.argv[2:5], float(sys.argv[5]), sys.argv[7]
ANSWER = federation_pb2.SubJobEvent(
    partial=common_pb2.ResultFrame(header=common_pb2.ResultHeader(
        header_json='{"doc": {"partials": [], "epsilon": null, "mechanism": null}, "arrays": {}}')),
    site=common_pb2.SiteEvent(site=name, state="done", n=10))
class Peer(federation_pb2_grpc.FederationServiceServicer):
    async def RunSubJob(self, request, context):
        await asyncio.sleep(delay)
        yield ANSWER
    async def SubJobs(self, request_iterator, context):
        # As stimnetd serves them: it speaks first, then answers each sub-job when it is done.
        await context.send_initial_metadata((("x-stimnet-multiplexed", "1"),))
        replies = asyncio.Queue()
        async def one(call):
            await asyncio.sleep(delay)
            replies.put_nowait(federation_pb2.SubJobReply(id=call.id, event=ANSWER))
        async def read():
            tasks = [asyncio.ensure_future(one(c)) async for c in request_iterator if c.start.job.payload]
            await asyncio.gather(*tasks)
            replies.put_nowait(None)
        reader = asyncio.ensure_future(read())
        while (r := await replies.get()) is not None:
            yield r
async def main():
    s = grpc.aio.server()
    federation_pb2_grpc.add_FederationServiceServicer_to_server(Peer(), s)
    creds = grpc.ssl_server_credentials([(open(key,'rb').read(), open(cert,'rb').read())],
                                        root_certificates=open(ca,'rb').read(), require_client_auth=True)
    s.add_secure_port(f"127.0.0.1:{port}", creds); await s.start(); print("ready", flush=True)
    await s.wait_for_termination()
asyncio.run(main())
'''


def spawn(code: str, *args: object) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE)
    assert p.stdout is not None
    p.stdout.readline()
    return p


async def interleaved(calls, n: int, block: int = 25):  # type: ignore[no-untyped-def]
    """{name: (calls/s, latencies)} for `n` sequential calls of each, measured in turns of
    `block` calls: a busy spell of the shared machine falls on the figures alike, not on
    whichever happened to be measured then."""
    for call in calls.values():
        for _ in range(5):
            await call()
    lat: dict[str, list[float]] = {name: [] for name in calls}
    busy = dict.fromkeys(calls, 0.0)
    for start in range(0, n, block):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(min(block, n - start)):
                s = time.perf_counter()
                await call()
                lat[name].append(time.perf_counter() - s)
            busy[name] += time.perf_counter() - t0
    return {name: (len(lat[name]) / busy[name], lat[name]) for name in calls}


async def timed(call, n: int) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    for _ in range(5):
        await call()
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter()
        await call()
        lat.append(time.perf_counter() - s)
    return n / (time.perf_counter() - t0), lat


async def main(n: int, delayed_n: int, block: int) -> None:
    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    alice = pki.issue("alice", "researcher")
    ops = pki.issue("ops", "admin")
    procs: list[DaemonProcess] = []
    others: list[subprocess.Popen[bytes]] = []
    try:
        # 1. three real daemons on CNSIM
        ports = await _start_sites(tmp, pki, ops, procs)
        # 2. bare fan-out of the same shape
        bare_port = _start_bare(pki, others)
        measured = await _measure_against_bare(alice, ports[0], bare_port, n, block)
        # 3. 16 delayed peers vs 1
        one = await _delayed_latency(tmp, pki, alice, ops, 1, delayed_n, procs, others)
        sixteen = await _delayed_latency(tmp, pki, alice, ops, 16, delayed_n, procs, others)
    finally:
        for p in procs:
            p.kill()
        for o in others:
            o.terminate()
            o.wait()
    _report(n, measured, one, sixteen)


async def _start_sites(tmp: Path, pki: CertFactory, ops: CertPaths,
                       procs: list[DaemonProcess]) -> list[int]:
    """Three daemons serving CNSIM, each the others' static peer; their ports."""
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        name = f"site-{'abc'[i]}"
        certs = pki.issue(name, "node")
        cfg = write_node_config(
            tmp / name, certs, name, port=port, crl=pki.crl_path,
            catalogs=[cnsim_catalog(tmp, i + 1)], logging={"level": "warning"},
            privacy={"overlap_guard": True}, gossip={"enabled": False},
            federation={"peers": [f"127.0.0.1:{p}" for p in ports if p != port]})
        procs.append(DaemonProcess(cfg))
    for p, port in zip(procs, ports, strict=True):
        await p.wait_healthy(ops, f"127.0.0.1:{port}")
    return ports


def _start_bare(pki: CertFactory, others: list[subprocess.Popen[bytes]]) -> int:
    """The bare fan-out: an entry and three peers with empty handlers; the entry's port."""
    node = pki.issue("bare", "node", hosts=("127.0.0.1",))
    bports = [free_port() for _ in range(4)]
    for bp in bports[1:]:
        others.append(spawn(BARE, "peer", bp, node.key, node.cert, node.ca, 0))
    others.append(spawn(BARE, "entry", bports[0], node.key, node.cert, node.ca, 0,
                        *[f"127.0.0.1:{bp}" for bp in bports[1:]]))
    return bports[0]


async def _measure_against_bare(alice: CertPaths, entry_port: int, bare_port: int, n: int,
                                block: int) -> dict[str, tuple[float, list[float]]]:
    """(queries/s, latencies) of federated queries, the bare unary fan-out and the bare
    streaming fan-out, measured in interleaved turns of `block`."""
    import grpc

    creds = client_config(alice, f"127.0.0.1:{bare_port}").credentials()
    async with AsyncClient(client_config(alice, f"127.0.0.1:{entry_port}", 30)) as c, \
            grpc.aio.secure_channel(f"127.0.0.1:{bare_port}", creds) as ch:
        call = ch.unary_unary("/bench.Entry/Run")
        stream = ch.unary_stream("/bench.Entry/RunStream")

        async def fed_query() -> None:
            await c.query("SELECT count(LAB_TSC), avg(LAB_TSC) FROM cnsim", federated=True,
                          min_sites=3)

        async def bare_query() -> None:
            await call(b"q", timeout=10)

        async def bare_stream_query() -> None:
            async for _ in stream(b"q", timeout=10):
                pass
        return await interleaved(
            {"stimnet": fed_query, "bare": bare_query, "stream": bare_stream_query}, n, block)


async def _delayed_latency(tmp: Path, pki: CertFactory, alice: CertPaths, ops: CertPaths,
                           k: int, delayed_n: int, procs: list[DaemonProcess],
                           others: list[subprocess.Popen[bytes]]) -> float:
    """Median latency of an entry whose `k` peers each take 200 ms."""
    fports = [free_port() for _ in range(k)]
    # Each with a certificate of its own name: the entry sends a site's share only
    # to the node its certificate names, and a peer must answer under that name.
    # Named by run and index, not port: a port the 1-peer run used may come back.
    fnames = [f"slow{k}-{i}" for i in range(k)]
    fcerts = [pki.issue(fn, "node", hosts=("127.0.0.1",)) for fn in fnames]
    fakes = [spawn(FAKE_PEER, fp, fc.key, fc.cert, fc.ca, 0.2, ROOT, fn)
             for fp, fc, fn in zip(fports, fcerts, fnames, strict=True)]
    others.extend(fakes)
    eport = free_port()
    ename = f"entry-{k}"
    ecerts = pki.issue(ename, "node")
    cfg = write_node_config(
        tmp / ename, ecerts, ename, port=eport, crl=pki.crl_path, catalogs=[],
        logging={"level": "warning"}, gossip={"enabled": False},
        federation={"peers": [f"127.0.0.1:{fp}" for fp in fports]})
    entry = DaemonProcess(cfg)
    procs.append(entry)
    await entry.wait_healthy(ops, f"127.0.0.1:{eport}")
    async with AsyncClient(client_config(alice, f"127.0.0.1:{eport}", 30)) as c:
        async def q() -> None:
            job = await c.submit_query("SELECT count(LAB_TSC) FROM cnsim", federated=True)
            states = {}
            async for kind, value in c.watch(job.id):
                if kind == "site":
                    states[value.site] = value.state + (
                        f": {value.detail}" if value.state != "done" else "")
            # A timing of failing sub-jobs would measure the wrong thing.
            assert len(states) == k and set(states.values()) == {"done"}, states
        _, lat_k = await timed(q, delayed_n)
    return statistics.median(lat_k)


def _report(n: int, measured: dict[str, tuple[float, list[float]]], one: float,
            sixteen: float) -> None:
    (qps, lat), (bqps, blat), (sqps, slat) = (
        measured["stimnet"], measured["bare"], measured["stream"])
    p50, bp50, sp50 = percentile(lat, 50), percentile(blat, 50), percentile(slat, 50)
    print(f"{n} sequential queries each; 3 sites on loopback; CNSIM catalog")
    print(f"bare mTLS fan-out (baseline) : {bqps:7.1f} q/s   p50 {bp50 * 1000:7.2f} ms")
    print(f"stimnet federated query      : {qps:7.1f} q/s   p50 {p50 * 1000:7.2f} ms")
    print(f"latency ratio stimnet / bare : {p50 / bp50:7.2f}   (goal <= 3)")
    print(f"throughput                   : {qps:7.1f} q/s   (goal >= 100; "
          f"{qps / bqps:.2f} of the bare fan-out's rate in this run)")
    # Not the goal's baseline: the same fan-out with server-streaming calls at both hops (the
    # call type StimNet's RunJob and RunSubJob have), to tell gRPC's cost of streaming calls
    # apart from StimNet's own work.
    print(f"bare fan-out, streaming calls: {sqps:7.1f} q/s   p50 {sp50 * 1000:7.2f} ms   "
          f"(stimnet / this: {p50 / sp50:.2f})")
    print(f"200 ms peers: 1 peer p50 {one * 1000:.0f} ms, 16 peers p50 {sixteen * 1000:.0f} ms, "
          f"ratio {sixteen / one:.2f}   (goal <= 1.25)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--delayed-n", type=int, default=15)
    ap.add_argument("--block", type=int, default=25,
                    help="queries per turn when interleaving the figures (n: one after another)")
    a = ap.parse_args()
    asyncio.run(main(a.n, a.delayed_n, max(1, a.block)))
