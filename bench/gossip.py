"""Gossip membership under the simulated transport (virtual time, LAN defaults).

For N = 8, 32, 128 nodes started together with one seed it prints:
  * gossip rounds until every member sees every other alive, and that over log2(N)
    (target: at most 2);
  * after killing one member, seconds and probe rounds until every survivor marks it
    dead, next to the suspicion timeout (dead must not come sooner) and the worst-case
    bound (round-robin reach + probe + suspicion + dissemination);
  * bytes sent per member per round on the probe path (after convergence, and while the
    killed member is being detected) as a ratio to the cap that max_piggyback puts on it
    (the same for every N), and on push-pull as a ratio to the N=8 run of the same
    process: push-pull carries the full table, so it grows with N.

Run: .venv/bin/python bench/gossip.py
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.sim import MessageSizer, SimCluster, run_virtual

SIZES = (8, 32, 128)
STEADY_PROBE_ROUNDS = 10


@dataclass
class Result:
    n: int
    converge_rounds: float
    dead_after: float
    first_suspect_after: float
    suspicion_timeout: float
    worst_case_bound: float
    probe_steady: float
    probe_churn: float
    push_pull: float
    probe_cap: float
    wall: float


def worst_case_bound(config: GossipConfig, n: int) -> float:
    return ((2 * (n - 1) + 1) * config.probe_interval + config.suspicion_timeout(n)
            + 2 * math.log2(n) * config.gossip_interval)


async def measure(n: int) -> Result:
    wall = time.perf_counter()
    config = GossipConfig()
    catalogs = lambda i: (("dbs_outcomes", 1),) if i % 2 == 0 else (("stim_volumes", 2),)  # noqa: E731
    async with SimCluster(n, config=config, seed=n, catalogs=catalogs) as cluster:
        loop = asyncio.get_running_loop()
        step = config.gossip_interval / 10
        converged = await cluster.wait_until(cluster.converged, 60, step=step)
        if converged is None:
            raise SystemExit(f"N={n}: no convergence within 60 s")

        cluster.network.reset_traffic()
        steady = STEADY_PROBE_ROUNDS * config.probe_interval
        await asyncio.sleep(steady)
        traffic = cluster.network.traffic
        probe_steady = traffic.bytes["probe"] / (n * STEADY_PROBE_ROUNDS)
        push_pull = traffic.bytes["push_pull"] / (n * steady / config.gossip_interval)

        entry = sum(MessageSizer().member(x.local_member()) for x in cluster.nodes.values()) / n
        # Each member sends one ping and, on average, answers one per probe round.
        probe_cap = 2 * (1 + config.max_piggyback) * entry

        victim = cluster.names[n // 2]
        first_suspect: list[float] = []
        for name in cluster.names:
            if name != victim:
                cluster.nodes[name].subscribe(
                    lambda c: first_suspect.append(loop.time())
                    if c.current.name == victim and c.current.status == "suspect" else None)
        await cluster.kill(victim)
        killed_at = loop.time()
        cluster.network.reset_traffic()
        dead_after = await cluster.wait_until(
            lambda: cluster.all_see([victim], ("dead",)), 600, step=step)
        if dead_after is None:
            raise SystemExit(f"N={n}: killed member not dead everywhere within 600 s")
        probe_churn = cluster.network.traffic.bytes["probe"] / (
            (n - 1) * dead_after / config.probe_interval)
    return Result(
        n=n,
        converge_rounds=converged / config.gossip_interval,
        dead_after=dead_after,
        first_suspect_after=min(first_suspect) - killed_at,
        suspicion_timeout=config.suspicion_timeout(n - 1),
        worst_case_bound=worst_case_bound(config, n),
        probe_steady=probe_steady,
        probe_churn=probe_churn,
        push_pull=push_pull,
        probe_cap=probe_cap,
        wall=time.perf_counter() - wall,
    )


def main() -> None:
    config = GossipConfig()
    print(f"gossip bench: simulated transport, virtual time, LAN defaults "
          f"(gossip {config.gossip_interval}s, probe {config.probe_interval}s, "
          f"fanout {config.fanout}, max_piggyback {config.max_piggyback})\n")
    results = [run_virtual(measure(n)) for n in SIZES]
    base = results[0]

    print("convergence from one seed (gossip rounds until everyone sees everyone alive)")
    print(f"{'N':>5} {'rounds':>8} {'/log2(N)':>9} {'target':>7}")
    for r in results:
        ratio = r.converge_rounds / math.log2(r.n)
        print(f"{r.n:>5} {r.converge_rounds:>8.2f} {ratio:>9.2f} {'<= 2':>7}"
              f"  {'ok' if ratio <= 2 else 'OVER'}")

    print("\nfailure detection of one killed member (seconds after the kill)")
    print(f"{'N':>5} {'1st suspect':>12} {'dead@all':>9} {'probe rnds':>11} "
          f"{'suspicion':>10} {'dead-1st/susp':>14} {'bound':>8} {'/bound':>7}")
    for r in results:
        print(f"{r.n:>5} {r.first_suspect_after:>12.2f} {r.dead_after:>9.2f} "
              f"{r.dead_after / config.probe_interval:>11.1f} {r.suspicion_timeout:>10.2f} "
              f"{(r.dead_after - r.first_suspect_after) / r.suspicion_timeout:>14.2f} "
              f"{r.worst_case_bound:>8.1f} {r.dead_after / r.worst_case_bound:>7.2f}")

    print("\nbytes sent per member per round (probe round = probe_interval, push-pull round = "
          "gossip_interval)\nprobe cap = ping + ack each carrying 1 + max_piggyback entries; "
          "push-pull ratio is to N=8")
    print(f"{'N':>5} {'probe cap':>10} {'steady':>7} {'/cap':>5} {'churn':>7} {'/cap':>5} "
          f"{'push-pull':>10} {'ratio':>6} {'N/8':>5}")
    for r in results:
        print(f"{r.n:>5} {r.probe_cap:>10.0f} {r.probe_steady:>7.0f} "
              f"{r.probe_steady / r.probe_cap:>5.2f} {r.probe_churn:>7.0f} "
              f"{r.probe_churn / r.probe_cap:>5.2f} {r.push_pull:>10.0f} "
              f"{r.push_pull / base.push_pull:>6.2f} {r.n / 8:>5.0f}")

    print("\nwall seconds per run: " + ", ".join(f"N={r.n}: {r.wall:.1f}" for r in results))


REAL_N = 8
REAL = {"gossip_interval_s": 0.2, "probe_interval_s": 1.0, "probe_timeout_s": 0.5,
        "suspicion_mult": 4}


async def measure_real(n: int = REAL_N) -> dict[str, float]:
    """N real stimnetd processes on loopback (mTLS, LAN defaults), one seed; a killed one."""
    import signal
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stimctl.client import AsyncClient
    from stimnetd.testing import CertFactory, DaemonProcess
    from tests.helpers import client_config

    tmp = Path(tempfile.mkdtemp(prefix="stimnet-gossip-"))
    pki = CertFactory(tmp / "pki")
    ops = pki.issue("ops", "admin")
    names, ports, configs = _real_configs(tmp, pki, n)
    procs: list[DaemonProcess] = []

    async def views(skip: int = -1) -> list[dict[str, str]]:
        out = []
        for i, port in enumerate(ports):
            if i == skip:
                continue
            async with AsyncClient(client_config(ops, f"127.0.0.1:{port}", 3)) as c:
                out.append({p.name: p.status for p in await c.peers()})
        return out

    try:
        # The seed first, as a federation is deployed: nodes started with it would race its
        # listening (a first join that finds it not yet up retries with doubling backoff),
        # and the figure would measure that race, not gossip.
        procs.append(DaemonProcess(configs[0]))
        await procs[0].wait_healthy(ops, f"127.0.0.1:{ports[0]}")
        procs.extend(DaemonProcess(cfg) for cfg in configs[1:])
        for p, port in zip(procs, ports, strict=True):
            await p.wait_healthy(ops, f"127.0.0.1:{port}")
        started = time.monotonic()
        while not all(len(v) == n and set(v.values()) == {"alive"} for v in await views()):
            await asyncio.sleep(0.05)
        converge = time.monotonic() - started
        victim = n - 1
        procs[victim].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while not all(v.get(names[victim]) == "dead" for v in await views(skip=victim)):
            await asyncio.sleep(0.05)
        dead = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    # Processes are started one after another; convergence is counted from the moment
    # the last one answered health, so it understates nothing.
    return {"converge_s": converge, "dead_s": dead}


def _real_configs(tmp, pki, n: int):  # type: ignore[no-untyped-def]
    """Names, ports and config files of `n` nodes on loopback, node-0 the others' seed."""
    from stimnetd.testing import free_port, write_node_config

    ports = [free_port() for _ in range(n)]
    names = [f"node-{i}" for i in range(n)]
    configs = []
    for i, port in enumerate(ports):
        cfg = write_node_config(tmp / names[i], pki.issue(names[i], "node"), names[i],
                                port=port, crl=pki.crl_path, gossip=REAL,
                                logging={"level": "warning"}, scripts={"policy": "deny"},
                                federation={"seeds": [] if i == 0 else [f"127.0.0.1:{ports[0]}"]})
        configs.append(cfg)
    return names, ports, configs


def main_real() -> None:
    cfg = GossipConfig(gossip_interval=REAL["gossip_interval_s"],
                       probe_interval=REAL["probe_interval_s"],
                       probe_timeout=REAL["probe_timeout_s"], suspicion_mult=REAL["suspicion_mult"])
    r = asyncio.run(measure_real())
    rounds = r["converge_s"] / cfg.gossip_interval
    bound = worst_case_bound(cfg, REAL_N)
    print(f"\nreal daemons: N={REAL_N} stimnetd processes, mTLS on loopback, LAN defaults")
    print(f"  convergence after all were up: {r['converge_s']:.2f}s = {rounds:.1f} gossip rounds, "
          f"/log2(N) = {rounds / math.log2(REAL_N):.2f} (target <= 2)")
    print(f"  killed member dead everywhere after {r['dead_s']:.2f}s; suspicion timeout "
          f"{cfg.suspicion_timeout(REAL_N):.2f}s; worst-case bound {bound:.1f}s "
          f"(ratio {r['dead_s'] / bound:.2f})")


if __name__ == "__main__":
    import sys as _sys

    main()
    if "--no-real" not in _sys.argv:
        main_real()
