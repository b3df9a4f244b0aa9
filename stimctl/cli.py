"""`stimctl`: thin — parse, call the client, print. Errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from stimctl import output
from stimctl.client import AsyncClient, ClientConfig, ClientError
from stimctl.exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    exit_code,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stimnet")
    except PackageNotFoundError:
        return "unknown"


def _pb(msg: Any) -> dict[str, Any]:
    return output.message_dict(msg)


# -- node commands -------------------------------------------------------------------


async def cmd_info(c: AsyncClient, args: argparse.Namespace) -> int:
    info = await c.info()
    if args.json:
        output.emit_json(_pb(info))
        return 0
    output.kv(f"node {info.name}", [
        ("version", info.version), ("you are", f"{info.caller_role}/{info.caller}"),
        ("k_min", info.k_min), ("differential privacy", info.dp_policy),
        ("scripts", info.script_policy), ("catalogs", ", ".join(info.catalogs) or "-"),
        ("budget per researcher", f"epsilon {info.budget_epsilon:g} per catalog"),
        ("site-wide budget", (f"epsilon {info.catalog_budget_epsilon:g} per catalog, all "
                              "researchers; left: " + ", ".join(
                                  f"{k}: {v:g}" for k, v in
                                  sorted(info.catalog_epsilon_remaining.items())))
         if info.catalog_budget_epsilon else "none"),
        ("delta per noised query", f"{info.delta_per_query:g}"),
        ("auditing history", "shared per catalog" if info.shared_history
         else "per researcher"),
    ])
    return 0


async def cmd_catalogs(c: AsyncClient, args: argparse.Namespace) -> int:
    cats = await c.catalogs(federated=args.federated)
    if args.json:
        output.emit_json([_pb(x) for x in cats])
        return 0
    output.table("catalogs", ["site", "name", "version", "subjects", "tables", "description"],
                 [[x.site, x.name, x.schema_version, x.subjects or "-", ", ".join(x.tables) or "-",
                   x.description] for x in cats])
    return 0


async def cmd_describe(c: AsyncClient, args: argparse.Namespace) -> int:
    d = await c.describe(args.name)
    if args.json:
        output.emit_json(_pb(d))
        return 0
    s = d.summary
    output.kv(f"catalog {s.name} at {s.site}", [
        ("description", s.description), ("schema version", s.schema_version),
        ("subjects", s.subjects), ("subject key", d.subject_key),
        ("tables", ", ".join(f"{t.name} ({t.rows} rows)" for t in d.tables)),
        ("ROIs", ", ".join(d.rois) or "-"),
    ])
    output.table("fields", ["field", "table", "type", "unit", "bounds / levels", "description"],
                 [[f.name, f.table, f"{f.type} (continuous)" if f.continuous else f.type, f.unit,
                   f"[{f.lower:g}, {f.upper:g}]" if f.has_bounds else ", ".join(f.levels),
                   f.description] for f in d.fields])
    if d.images:
        output.table("images", ["field", "shape", "voxel size (mm)", "orientation"],
                     [[i.field, "×".join(map(str, i.shape)),
                       "×".join(f"{v:g}" for v in i.voxel_size), i.space] for i in d.images])
    if d.grids:
        output.table("grid per site", ["site", "shape", "voxel size (mm)", "space", "from"],
                     [_grid_row(g) for g in d.grids])
    return 0


def _grid_row(g: Any) -> list[str]:
    """One row of `describe`'s grid table (a SiteGrid)."""
    if g.error or not g.shape:
        return [g.site, "-", "-", "-", f"not known: {g.error}" if g.error else "no images"]
    a = list(g.affine)
    zooms = [sum(a[4 * r + c] ** 2 for r in range(3)) ** 0.5 for c in range(3)]
    return [g.site, "×".join(map(str, g.shape)), "×".join(f"{z:g}" for z in zooms),
            g.space or "-", "declared" if g.declared else "its images"]


async def cmd_peers(c: AsyncClient, args: argparse.Namespace) -> int:
    peers = await c.peers()
    if args.json:
        output.emit_json([_pb(p) for p in peers])
        return 0
    output.table("peers", ["name", "address", "status", "incarnation", "last heard", "catalogs"],
                 [[p.name, p.address, p.status, p.incarnation,
                   output.ago(p.last_heard.ToSeconds()), ", ".join(p.catalogs)] for p in peers])
    return 0


async def cmd_status(c: AsyncClient, args: argparse.Namespace) -> int:
    s = await c.status()
    if args.json:
        output.emit_json(_pb(s))
        return 0
    output.kv(f"node {s.name}", [
        ("version", s.version), ("uptime", output.duration(s.uptime_s)),
        ("peers", ", ".join(f"{k}: {v}" for k, v in sorted(s.peers_by_status.items())) or "-"),
        ("jobs", ", ".join(f"{k}: {v}" for k, v in sorted(s.jobs_by_state.items())) or "-"),
        ("queue depth", s.queue_depth),
        ("epsilon spent", ", ".join(f"{k}: {v:g}" for k, v in
                                    sorted(s.epsilon_spent_by_catalog.items())) or "-"),
    ])
    return 0


async def cmd_audit_verify(c: AsyncClient, args: argparse.Namespace) -> int:
    v = await c.audit_verify()
    if args.json:
        output.emit_json(_pb(v))
    elif v.ok:
        print(f"audit chain ok: {v.entries} entries verified")
    else:
        print(f"audit chain BROKEN at entry {v.first_bad_seq}: {v.problem}")
    return 0 if v.ok else EXIT_ERROR


async def cmd_audit_export(c: AsyncClient, args: argparse.Namespace) -> int:
    since = output.parse_since(args.since) if args.since else 0.0
    async for e in c.audit_export(since):
        row = _pb(e)
        row["detail"] = json.loads(row.pop("detail_json", "{}") or "{}")
        print(json.dumps(row, sort_keys=True))
    return 0


# -- wiring ----------------------------------------------------------------------------

Handler = Callable[[AsyncClient, argparse.Namespace], Coroutine[Any, Any, int]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stimctl", description="StimNet researcher and operator CLI")
    p.add_argument("--config", "-c", type=Path, default=None,
                   help="client config (default ~/.config/stimnet/client.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--version", action="version", version=f"stimctl {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def node_cmd(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(handler=handler)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        return sp

    node_cmd("info", cmd_info, "who the node is and what it allows")
    node_cmd("catalogs", cmd_catalogs, "list catalogs").add_argument(
        "--federated", action="store_true", help="include every member's catalogs")
    node_cmd("describe", cmd_describe, "schema and metadata of a catalog").add_argument("name")
    node_cmd("peers", cmd_peers, "federation members known to the node")
    node_cmd("status", cmd_status, "node summary (admin)")
    audit = sub.add_parser("audit", help="audit log (admin)")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the hash chain")
    v.set_defaults(handler=cmd_audit_verify)
    e = asub.add_parser("export", help="export entries as JSON lines")
    e.add_argument("--since", help="ISO date/time or unix seconds")
    e.add_argument("--format", choices=["jsonl"], default="jsonl")
    e.set_defaults(handler=cmd_audit_export)

    from stimctl import certs_cli, demo, jobs_cli

    certs_cli.register(sub)
    demo.register(sub)
    jobs_cli.register(sub, node_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    # Output piped into a reader that stops (`| head`): end quietly, as Unix tools do,
    # instead of a BrokenPipeError traceback.
    if hasattr(signal, "SIGPIPE"):
        with contextlib.suppress(ValueError):  # called off the main thread (tests)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "func", None) is not None:  # local commands (certs, demo): no node
            return int(args.func(args))
        config = ClientConfig.load(args.config)
        return asyncio.run(_run(config, args))
    except ClientError as exc:
        print(f"stimctl: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR  # where SIGPIPE cannot be restored


async def _run(config: ClientConfig, args: argparse.Namespace) -> int:
    async with AsyncClient(config) as client:
        return await args.handler(client, args)


if __name__ == "__main__":
    sys.exit(main())
