"""Shared bench helpers: a throw-away PKI, daemon processes, a bare mTLS echo server."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ECHO_SERVER = r'''
import asyncio, sys, grpc
async def main(port, key, cert, ca):
    def echo(req, ctx): return req
    async def aecho(req, ctx): return req
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(aecho)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(open(key,'rb').read(), open(cert,'rb').read())],
                                        root_certificates=open(ca,'rb').read(),
                                        require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main(int(sys.argv[1]), *sys.argv[2:5]))
'''


def workdir() -> Path:
    """A fresh directory for one run's PKI, catalogs and databases (20-35 MB for
    query.py), removed when the script exits; STIMNET_BENCH_KEEP=1 keeps it (and says
    where) to read the daemons' logs afterwards."""
    path = Path(tempfile.mkdtemp(prefix="stimnet-bench-"))
    if os.environ.get("STIMNET_BENCH_KEEP"):
        atexit.register(lambda: print(f"kept {path}", file=sys.stderr))
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def start_echo(port: int, key: Path, cert: Path, ca: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port), str(key), str(cert),
                             str(ca)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


async def rate(call: Callable[[], Awaitable[object]], seconds: float, concurrency: int) -> float:
    """Completed calls per second with `concurrency` callers for `seconds` (after warm-up)."""
    for _ in range(20):
        await call()
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return done / (time.perf_counter() - started)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def start_demo_sites(tmp: Path, prefix: str, subjects: int, *, privacy: dict | None = None,
                           catalogs: list[dict] | None = None,
                           prepare: Callable[[Path, dict], dict] | None = None,
                           federation: dict | None = None
                           ) -> tuple[list, list[int], list[Path], object]:
    """Three loopback `stimnetd` processes on demo catalogs (or on `catalogs`, one entry
    with its root per site), peered statically, DP off by default; `prepare(root, entry)`
    may rewrite a demo catalog (and return its entry) before its daemon starts;
    `federation` adds [federation] settings (subjob_timeout_s). Returns
    (processes, ports, store paths, a researcher's certificates); the caller stops the
    processes."""
    from stimctl import demodata
    from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config

    pki = CertFactory(tmp / "pki")
    ops, alice = pki.issue("ops", "admin"), pki.issue("alice", "researcher")
    ports = [free_port() for _ in range(3)]
    procs: list[DaemonProcess] = []
    dbs: list[Path] = []
    try:
        for i, port in enumerate(ports):
            name = f"{prefix}-{'abc'[i]}"
            root = tmp / f"catalog-{name}"
            entry = {**demodata.generate_site(root, site=name, site_index=i,
                                              n_subjects=subjects, seed=11 + i),
                     "root": str(root)} if catalogs is None else catalogs[i]
            if prepare is not None and catalogs is None:
                entry = prepare(root, entry)
            cfg = write_node_config(
                tmp / name, pki.issue(name, "node"), name, port=port, crl=pki.crl_path,
                catalogs=[entry], logging={"level": "warning"},
                privacy=privacy or {"dp": "off"}, gossip={"enabled": False},
                federation={"peers": [f"127.0.0.1:{p}" for p in ports if p != port],
                            **(federation or {})})
            procs.append(DaemonProcess(cfg))
            dbs.append(tmp / name / "state" / "stimnetd.sqlite3")
        for proc, port in zip(procs, ports, strict=True):
            await proc.wait_healthy(ops, f"127.0.0.1:{port}")
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs, ports, dbs, alice


def rss_mb(pid: int) -> float:
    """A process's resident set size now (Linux /proc)."""
    from stimnetd.memtrim import rss_bytes

    return rss_bytes(pid) / 2**20


def timed(fn, repeat: int, *, warmup: bool = True) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of `repeat` calls of `fn`, after one warm-up call unless `warmup`
    is False (a baseline whose first call must count, e.g. reading files cold)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
