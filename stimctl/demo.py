"""`stimctl demo init|run`: a local federation of real daemons doing real federated work.

`init` makes a CA, node and researcher certificates, one admin per site (`ops-<site>`,
the only admin that site's `[node] admins` names), a synthetic DBS cohort and a config per
site. `run` starts every site as a daemon process on free loopback ports,
waits until each answers a gRPC health check, shows what works end to end, then stops
them with SIGTERM and checks each exited cleanly.

The daemon is run as the program its package installs (pyproject `[project.scripts]`), as
an operator runs it: the client depends on the daemon as a program, never as a module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import tomli_w

from stimctl import output

# The daemon's console script.
DAEMON_PROGRAM = "stimnetd"
NODE_CONFIG = "node.toml"
NODE_LOG = "node.log"

DemoStep = Callable[["DemoFederation"], Awaitable[None]]


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="a local demo federation")
    dsub = demo.add_subparsers(dest="demo_command", required=True)
    init = dsub.add_parser("init", help="create CA, certificates, configs and data")
    init.add_argument("dir", type=Path)
    init.add_argument("--sites", type=int, default=3)
    init.add_argument("--subjects", type=int, default=60, help="subjects per site")
    init.add_argument("--force", action="store_true", help="reuse a non-empty directory")
    init.set_defaults(func=cmd_init)
    run = dsub.add_parser("run", help="start the sites, show federated work, stop them")
    run.add_argument("dir", type=Path, nargs="?", default=Path("demo-federation"))
    run.add_argument("--keep-running", action="store_true",
                     help="leave the daemons running until Ctrl-C")
    run.set_defaults(func=cmd_run)


# -- init -------------------------------------------------------------------------------


def site_names(n: int) -> list[str]:
    return [f"hospital-{chr(ord('a') + i)}" for i in range(n)]


def cmd_init(args: argparse.Namespace) -> int:
    try:
        init(args.dir, sites=args.sites, subjects=args.subjects, force=args.force)
    except (ValueError, OSError) as exc:
        print(f"stimctl: error: {exc}", file=sys.stderr)
        return 2
    print(f"demo federation created in {args.dir}: run `stimctl demo run {args.dir}`")
    return 0


def init(root: Path, *, sites: int = 3, subjects: int = 60, force: bool = False) -> None:
    from stimctl import demodata
    from stimnet import pki

    if not 1 <= sites <= 26:
        raise ValueError("--sites must be between 1 and 26")
    if root.exists() and any(root.iterdir()) and not force:
        raise ValueError(f"{root} exists and is not empty (use --force to reuse it)")
    root.mkdir(parents=True, exist_ok=True)
    names = site_names(sites)
    ca = root / "ca"
    if not (ca / pki.CA_CERT).exists():
        pki.init_ca(ca, common_name="StimNet Demo Federation CA")
    catalogs = demodata.generate_federation(root / "data", names, n_subjects=subjects)
    ports = free_ports(len(names))
    for name, port in zip(names, ports, strict=True):
        site_dir = root / "sites" / name
        certs = site_dir / "certs"
        if not (certs / f"{name}.crt").exists():
            pki.issue(ca, name, "node", certs, hosts=("127.0.0.1", "localhost"))
        entry = dict(catalogs[name])
        entry["root"] = os.path.relpath(root / "data" / name, site_dir)
        write_site_config(site_dir, name, port, entry, seed_port=ports[0])
        # An admin certificate is valid at every node; each site obeys its own only.
        admin_dir = root / "admin" / name
        if not (admin_dir / f"{admin_name(name)}.crt").exists():
            pki.issue(ca, admin_name(name), "admin", admin_dir)
        write_client_config(admin_dir, admin_name(name), port)
    d = root / "researcher"
    if not (d / "alice.crt").exists():
        pki.issue(ca, "alice", "researcher", d)
    write_client_config(d, "alice", ports[0])


def admin_name(site: str) -> str:
    """The demo's admin of `site`."""
    return f"ops-{site}"


def write_site_config(site_dir: Path, name: str, port: int, catalog: dict[str, Any], *,
                      seed_port: int) -> None:
    cfg = {
        "node": {"name": name, "listen": f"127.0.0.1:{port}", "state_dir": "state", "k_min": 5,
                 "grace_s": 5.0, "admins": [admin_name(name)]},
        "tls": {"ca": "certs/ca.crt", "cert": f"certs/{name}.crt", "key": f"certs/{name}.key",
                "crl": "../../ca/crl.pem"},
        "privacy": {"dp": "optional", "default_epsilon": 1.0, "max_epsilon_per_query": 5.0,
                    "budget_epsilon": 20.0},
        "federation": {"seeds": [] if port == seed_port else [f"127.0.0.1:{seed_port}"],
                       "subjob_timeout_s": 30.0},
        "scripts": {"policy": "auto", "log_policy": "errors", "timeout_s": 120.0},
        "metrics": {"listen": f"127.0.0.1:{port + 1000}"} if port + 1000 < 65536 else {},
        "catalogs": [catalog],
    }
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / NODE_CONFIG).write_text(tomli_w.dumps(cfg))


def write_client_config(d: Path, ident: str, port: int) -> None:
    (d / "client.toml").write_text(tomli_w.dumps({
        "address": f"127.0.0.1:{port}", "ca": "ca.crt", "cert": f"{ident}.crt",
        "key": f"{ident}.key", "timeout_s": 60.0}))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def reassign_ports(root: Path) -> dict[str, str]:
    """Give every site a currently free port (the ones chosen at init may be taken now)."""
    site_dirs = sorted((root / "sites").iterdir())
    ports = free_ports(len(site_dirs))
    addresses: dict[str, str] = {}
    for site_dir, port in zip(site_dirs, ports, strict=True):
        path = site_dir / NODE_CONFIG
        cfg = tomllib.loads(path.read_text())
        cfg["node"]["listen"] = f"127.0.0.1:{port}"
        cfg["node"].pop("advertise", None)
        cfg["federation"]["seeds"] = [] if port == ports[0] else [f"127.0.0.1:{ports[0]}"]
        cfg["federation"].pop("peers", None)  # sites find each other by gossip from one seed
        if "metrics" in cfg:
            cfg["metrics"] = {"listen": f"127.0.0.1:{free_ports(1)[0]}"}
        path.write_text(tomli_w.dumps(cfg))
        addresses[cfg["node"]["name"]] = f"127.0.0.1:{port}"
    write_client_config(root / "researcher", "alice", ports[0])
    for name, address in addresses.items():
        write_client_config(root / "admin" / name, admin_name(name), int(address.rsplit(":")[1]))
    return addresses


# -- run --------------------------------------------------------------------------------


def daemon_program() -> str:
    """The daemon's console script: the one beside this interpreter (installed with this
    client in one environment), else the first on PATH.

    Raises:
        FileNotFoundError: neither exists.
    """
    beside = Path(sys.executable).parent / DAEMON_PROGRAM
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(DAEMON_PROGRAM)
    if found is None:
        raise FileNotFoundError(f"the demo runs the daemon program {DAEMON_PROGRAM!r}, which is "
                                f"neither beside {sys.executable} nor on PATH (pip install "
                                "stimnet installs it)")
    return found


class DemoFederation:
    """The demo's sites as processes of `program` (the daemon), each with its config.

    Args:
        root: the directory `init` made.
        program: the daemon's executable (`daemon_program`).
    """

    def __init__(self, root: Path, program: str) -> None:
        self.root = root
        self.program = program
        self.addresses: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def researcher_config(self) -> Path:
        return self.root / "researcher" / "client.toml"

    @property
    def admin_config(self) -> Path:
        """The first site's admin (each site obeys its own admin only)."""
        return self.admin_config_of(sorted(self.addresses)[0] if self.addresses
                                    else sorted(p.name for p in (self.root / "admin").iterdir())[0])

    def admin_config_of(self, site: str) -> Path:
        return self.root / "admin" / site / "client.toml"

    def site_config(self, name: str) -> Path:
        return self.root / "sites" / name / NODE_CONFIG

    def start(self) -> None:
        self.addresses = reassign_ports(self.root)
        for name in self.addresses:
            site_dir = self.root / "sites" / name
            log = (site_dir / NODE_LOG).open("ab")
            self.procs[name] = subprocess.Popen(
                [self.program, "--config", str(site_dir / NODE_CONFIG)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()

    async def wait_healthy(self, timeout_s: float = 60.0) -> None:
        from stimctl.client import ClientConfig
        from stimnet.health import wait_serving

        creds = ClientConfig.load(self.admin_config).credentials()
        for name, address in self.addresses.items():
            try:
                await wait_serving(address, creds, timeout_s=timeout_s,
                                   exited=self.procs[name].poll, interval_s=0.2)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"site {name}: {exc}; see "
                                   f"{self.root / 'sites' / name / NODE_LOG}") from None

    def stop(self, timeout_s: float = 20.0) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = None
        return codes


def cmd_run(args: argparse.Namespace) -> int:
    root: Path = args.dir
    if not (root / "sites").is_dir():
        print(f"stimctl: error: {root} is not a demo federation (run `stimctl demo init {root}`)",
              file=sys.stderr)
        return 2
    try:
        fed = DemoFederation(root, daemon_program())
    except FileNotFoundError as exc:
        print(f"stimctl: error: {exc}", file=sys.stderr)
        return 2

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # stop the sites on SIGTERM too, never orphan them

    signal.signal(signal.SIGTERM, terminate)
    fed.start()
    ok = False
    try:
        asyncio.run(_run(fed, keep_running=args.keep_running))
        ok = True
    except KeyboardInterrupt:
        ok = True
    except Exception as exc:  # noqa: BLE001 - the demo reports and still stops the sites
        print(f"stimctl: demo failed: {exc}", file=sys.stderr)
    finally:
        codes = fed.stop()
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        print(f"stimctl: sites did not stop cleanly: {bad}", file=sys.stderr)
        return 1
    print(f"all {len(codes)} sites stopped cleanly (exit 0)")
    return 0 if ok else 1


async def _run(fed: DemoFederation, *, keep_running: bool) -> None:
    print(f"starting {len(fed.procs)} sites: "
          + ", ".join(f"{n} on {a}" for n, a in fed.addresses.items()))
    await fed.wait_healthy()
    print("all sites healthy (grpc.health.v1 SERVING)\n")
    await show_sites(fed)
    for title, step in STEPS:
        output.console().rule(title)
        await step(fed)
    if keep_running:
        print("daemons running; Ctrl-C to stop")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


async def demo_membership(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient

    print("$ stimctl peers   (every site started knowing only the seed, hospital-a)")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        deadline = time.monotonic() + 30
        while True:
            peers = await c.peers()
            if len([p for p in peers if p.status == "alive"]) == len(fed.addresses):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sites did not find each other by gossip within 30 s")
            await asyncio.sleep(0.2)
    output.table("peers", ["name", "address", "status", "incarnation", "catalogs"],
                 [[p.name, p.address, p.status, p.incarnation, ", ".join(p.catalogs)]
                  for p in peers])


async def demo_table_query(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer

    # Every output over the same subjects (those with a UPDRS change): outputs whose
    # NULLs differ would give the size of their difference, and where that is one subject
    # exact auditing refuses the release (docs/privacy.md).
    sql = ("SELECT target, count(updrs_change), avg(updrs_change), stddev(updrs_change) "
           "FROM dbs_outcomes WHERE diagnosis = 'PD' GROUP BY target")
    print(f"$ stimctl query --federated \"{sql}\"")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        with Progress(enabled=True) as progress:
            answer = await c.query(sql, federated=True, min_sites=2, on_event=progress)
    print_answer(answer, argparse.Namespace(json=False, csv=False, out=None))


async def demo_dp_query(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import print_answer

    # Under DP a cell leaves a site only where its noised count clears k_min plus a margin
    # for delta (privacy/threshold.py); at epsilon 5 over four arrays that is some 15
    # subjects, which a demo site's PD patients clear.
    sql = "SELECT count(*), avg(updrs_change) FROM dbs_outcomes"
    print(f"$ stimctl query --federated --epsilon 5 \"{sql}\"")
    print("  (each site adds OpenDP Laplace noise calibrated to the declared bounds, releases "
          "only counts whose noised value clears its threshold, and charges epsilon 5 and "
          "delta to alice's budget)")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        answer = await c.query(sql, federated=True, min_sites=2, epsilon=5.0)
    print_answer(answer, argparse.Namespace(json=False, csv=False, out=None))
    print("note: noise scale follows the catalog's declared bounds (updrs_change in [-108, 108]);"
          " the epsilon is split over every statistic released, so small cohorts get noisy "
          "answers — that is the guarantee working, not a bug")


async def demo_sweet_spot(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer

    # The table's STN cell (PD patients with a UPDRS change), every output over it: a
    # cohort one subject off an earlier one would be refused by exact auditing.
    # The t-map tests the improvement of the subjects covering each voxel against 0, where
    # at least 10 % of them do, FDR-corrected across those voxels; each site withholds the
    # voxels with fewer than k_min subjects on either side.
    sql = ("SELECT count(vta_path), mean_map(vta_path, improvement_pct) AS sweet_spot, "
           "tmap(vta_path, improvement_pct, min_frac => 0.1, correction => 'fdr') AS "
           "sweet_spot_t, roi_overlap(vta_path) AS overlap FROM dbs_outcomes WHERE target = 'STN' AND "
           "diagnosis = 'PD' AND updrs_change IS NOT NULL AND improvement_pct IS NOT NULL")
    out = fed.root / "results" / "sweet_spot"
    print(f"$ stimctl query --federated \"{sql}\" --out {out}/")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        with Progress(enabled=True) as progress:
            answer = await c.query(sql, federated=True, min_sites=2, on_event=progress)
    print_answer(answer, argparse.Namespace(json=False, csv=False, out=out))


DEMO_SCRIPT = b"""\
# A researcher's own analysis, run in each site's hardened sandbox (no network, read-only
# data, non-root, resource limits). It may only emit aggregates; each site's privacy layer
# checks them against the catalog and, under dp = "required", runs it once per block of
# subjects and noises the blocks' mean before anything leaves the site.
from stimnet_runtime import load_table, emit_mean

outcomes = load_table("outcomes").merge(load_table("stimulation"), on="subject_id")
followed = outcomes[outcomes["updrs_change"].notna()]
emit_mean("mean_improvement", "updrs_change", followed["updrs_change"])
"""


# What the script emits, declared and signed with it: each site releases only exactly this.
# Under dp = "required" a script's outputs are released by sample-and-aggregate: each
# block of subjects' mean is clamped to the declared range, and the blocks' mean gets
# Laplace noise of scale (hi - lo) / (B·ε), so the range is the price of the answer's
# precision. One output at the sites' largest per-query ε.
DEMO_EPSILON = 5.0
DEMO_OUTPUTS = ("SELECT clamp(avg(updrs_change), -40, 40) AS mean_improvement "
                "FROM dbs_outcomes")


async def demo_script_job(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient
    from stimctl.jobs_cli import Progress, print_answer

    path = fed.root / "results" / "mean_improvement.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(DEMO_SCRIPT)
    print(f"$ stimctl submit {path} --catalog dbs_outcomes --federated --watch \\\n"
          f"    --outputs \"{DEMO_OUTPUTS}\"")
    async with AsyncClient.from_file(fed.researcher_config) as c:
        job = await c.submit_script(DEMO_SCRIPT, "dbs_outcomes", federated=True, min_sites=2,
                                    outputs=DEMO_OUTPUTS, epsilon=DEMO_EPSILON)
        with Progress(enabled=True) as progress:
            answer = await c.run_job(job, progress)
    print_answer(answer, argparse.Namespace(json=False, csv=False, out=None))
    charged = [m for m in answer.manifest if m.get("epsilon") is not None]
    for m in charged:
        print(f"  {m['site']}: charged (ε, δ) = ({m['epsilon']:g}, {m.get('delta') or 0:g})")


async def demo_metrics(fed: DemoFederation) -> None:
    import urllib.request

    cfg = tomllib.loads(fed.site_config(next(iter(fed.addresses))).read_text())
    url = f"http://{cfg['metrics']['listen']}/metrics"
    print(f"$ curl {url}   (selected lines)")
    # Store-derived gauges refresh every 2 s (a scrape never waits on the database), so
    # give the last query's charge and the last job's end a moment to show up.
    deadline = time.monotonic() + 6

    def settled(text: str) -> bool:
        busy = [ln for ln in text.splitlines()
                if ln.startswith(('stimnet_jobs{state="running"}', 'stimnet_jobs{state="queued"}'))
                and not ln.rstrip().endswith(" 0.0")]
        return "stimnet_epsilon_spent_total{" in text and not busy

    while True:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if settled(body) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    wanted = ("stimnet_rpc_total{", "stimnet_jobs{", "stimnet_queue_depth ", "stimnet_peers{",
              "stimnet_privacy_decisions_total{", "stimnet_epsilon_spent_total{",
              "stimnet_sandbox_run_seconds_count", "stimnet_certificate_expiry_timestamp_seconds",
              "stimnet_build_info")
    for line in body.splitlines():
        if line.startswith(wanted) and not line.rstrip().endswith(" 0.0"):
            print("  " + line)


# What `run` shows once the sites are healthy, in order, each under its title.
from stimctl.demo_models import demo_glm, demo_meta  # noqa: E402 - they take a DemoFederation

STEPS: tuple[tuple[str, DemoStep], ...] = (
    ("membership: gossip from one seed", demo_membership),
    ("federated table query: outcomes by DBS target", demo_table_query),
    ("differential privacy: noisy federated answer, budget charged", demo_dp_query),
    ("federated logistic regression: responder ~ amplitude + target", demo_glm),
    ("random-effects meta-analysis of mean UPDRS change across sites", demo_meta),
    ("federated sweet-spot maps: mean improvement per voxel, FDR-corrected t-map",
     demo_sweet_spot),
    ("federated script job in each site's Docker sandbox", demo_script_job),
    ("operations: Prometheus metrics of hospital-a", demo_metrics),
)


async def show_sites(fed: DemoFederation) -> None:
    from stimctl.client import AsyncClient, ClientConfig

    base = ClientConfig.load(fed.researcher_config)
    for name, address in fed.addresses.items():
        cfg = ClientConfig(address=address, ca=base.ca, cert=base.cert, key=base.key,
                           timeout_s=base.timeout_s)
        async with AsyncClient(cfg) as c:
            info = await c.info()
            cats = await c.catalogs()
        output.kv(f"{name} ({address})", [
            ("you are", f"{info.caller_role}/{info.caller}"), ("k_min", info.k_min),
            ("differential privacy", info.dp_policy),
            ("catalogs", ", ".join(f"{x.name}: {x.subjects} subjects" for x in cats)),
        ])
