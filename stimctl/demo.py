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
    init.add_argument("--dp", choices=("required", "optional", "off"), default="required",
                      help="the sites' [privacy] dp (default required: every answer noised "
                      "and charged; optional or off: exact answers, which the voxel maps and "
                      "models of the demo need at its size)")
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
        init(args.dir, sites=args.sites, subjects=args.subjects, force=args.force, dp=args.dp)
    except (ValueError, OSError) as exc:
        print(f"stimctl: error: {exc}", file=sys.stderr)
        return 2
    print(f"demo federation created in {args.dir}: run `stimctl demo run {args.dir}`")
    return 0


def init(root: Path, *, sites: int = 3, subjects: int = 60, force: bool = False,
         dp: str = "required") -> None:
    from stimctl import demodata
    from stimnet import pki

    if dp not in ("required", "optional", "off"):
        raise ValueError(f"--dp must be required, optional or off, not {dp!r}")
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
        write_site_config(site_dir, name, port, entry, seed_port=ports[0], dp=dp)
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
                      seed_port: int, dp: str = "required") -> None:
    from stimctl.demo_steps import DEMO_BUDGET_EPSILON, DEMO_MAX_EPSILON


    cfg = {
        "node": {"name": name, "listen": f"127.0.0.1:{port}", "state_dir": "state", "k_min": 5,
                 "grace_s": 5.0, "admins": [admin_name(name)]},
        "tls": {"ca": "certs/ca.crt", "cert": f"certs/{name}.crt", "key": f"certs/{name}.key",
                "crl": "../../ca/crl.pem"},
        "privacy": {"dp": dp, "default_epsilon": 1.0, "max_epsilon_per_query": DEMO_MAX_EPSILON,
                    "budget_epsilon": DEMO_BUDGET_EPSILON, "delta": 1e-6},
        "federation": {"seeds": [] if port == seed_port else [f"127.0.0.1:{seed_port}"],
                       "subjob_timeout_s": 180.0},
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

    @property
    def dp(self) -> str:
        """The sites' [privacy] dp (init gives every site the same)."""
        first = sorted((self.root / "sites").iterdir())[0] / NODE_CONFIG
        return str(tomllib.loads(first.read_text()).get("privacy", {}).get("dp", "required"))

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
    print(budget_note(fed) + "\n")
    for title, step in STEPS:
        output.console().rule(title)
        try:
            await step(fed)
        except (BudgetExhausted, JobFailed) as exc:
            if "budget exhausted" not in str(exc):
                raise
            raise RuntimeError(f"{exc} (earlier runs of the demo in {fed.root} spent alice's "
                               "budget: run it in a new directory)") from None
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


# What `run` shows once the sites are healthy, in order, each under its title.
from stimctl.demo_models import demo_glm, demo_meta  # noqa: E402 - they take a DemoFederation
from stimctl.demo_steps import (  # noqa: E402
    budget_note,
    demo_dp_query,
    demo_metrics,
    demo_script_job,
    demo_sweet_spot,
    demo_table_query,
)
from stimnet.errors import BudgetExhausted, JobFailed  # noqa: E402

STEPS: tuple[tuple[str, DemoStep], ...] = (
    ("membership: gossip from one seed", demo_membership),
    ("federated table query: outcomes by DBS target", demo_table_query),
    ("differential privacy: the whole cohort at ε 1, budget charged", demo_dp_query),
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
