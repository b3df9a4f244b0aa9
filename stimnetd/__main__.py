"""`stimnetd`: run a node, check a config, or back up a node's store.

Fatal problems print one line naming the problem and exit non-zero: 2 for configuration
(the operator must edit something), 1 for run-time failures.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from pathlib import Path

from stimnetd import __version__

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stimnetd", description="StimNet node daemon")
    p.add_argument("--version", action="version", version=f"stimnetd {__version__}")
    p.add_argument("--config", "-c", type=Path, help="node config (TOML)")
    sub = p.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate everything start-up would, then exit")
    check.add_argument("file", type=Path)
    backup = sub.add_parser("backup", help="consistent online copy of the node's store")
    backup.add_argument("dest", type=Path)
    backup.add_argument("--config", "-c", dest="backup_config", type=Path, required=True)
    init = sub.add_parser("init-store", help="start a new, empty store (audited); the old file "
                          "is kept beside it")
    init.add_argument("--config", "-c", dest="init_config", type=Path, required=True)
    init.add_argument("--force", action="store_true", help="required: ε spent and the audit "
                      "chain start again")
    return p


def _fatal(message: str, code: int) -> int:
    print(f"stimnetd: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported late so `stimnetd --version` and argument errors stay instant.
    from stimnet.errors import StimnetError
    from stimnetd.catalog import CatalogError
    from stimnetd.config import ConfigError, load_config
    from stimnetd.store import StoreCorrupt
    from stimnetd.tls import TlsError

    cfg_path = {"check-config": getattr(args, "file", None),
                "backup": getattr(args, "backup_config", None),
                "init-store": getattr(args, "init_config", None)}.get(args.command, args.config)
    if cfg_path is None:
        return _fatal("no config given (use --config FILE)", EXIT_CONFIG)
    try:
        config = load_config(cfg_path)
        if args.command == "backup":
            return asyncio.run(_backup(config, args.dest))
        if args.command == "init-store":
            return _init_store(config, args.force)
        from stimnetd import logs
        from stimnetd.daemon import Daemon

        logs.configure(config.log_level, node=config.node.name)
        daemon = Daemon(config)
        if args.command == "check-config":
            from stimnetd.store import Store

            if isinstance(daemon.store, Store):  # PostgreSQL checks its own pages
                Store.check_file(daemon.store.path)
            for warning in daemon.config_warnings(read_images=True):
                print(f"stimnetd: warning: {warning}", file=sys.stderr)
            print(f"{cfg_path}: ok (node {config.node.name}, "
                  f"{len(config.catalogs)} catalog(s), {sum(c.n_subjects for c in daemon.catalogs)} "
                  "subjects)")
            return 0
        _run_loop(daemon.run())
    except ConfigError as exc:
        return _fatal(str(exc), EXIT_CONFIG)
    except (CatalogError, TlsError) as exc:
        return _fatal(f"{cfg_path}: {exc}", EXIT_CONFIG)
    except (StoreCorrupt, StimnetError) as exc:
        return _fatal(str(exc), EXIT_RUNTIME)
    except OSError as exc:
        return _fatal(str(exc), EXIT_RUNTIME)
    except sqlite3.Error as exc:
        # Only from closing the store at shutdown (the log has the details).
        return _fatal(f"the store could not be closed cleanly: {exc}", EXIT_RUNTIME)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # noqa: BLE001 - an operator gets one line, never a traceback
        if args.command != "check-config":
            raise  # a running daemon's logs get the traceback
        return _fatal(f"{cfg_path}: unexpected problem ({type(exc).__name__}: {exc}); "
                      "please report it", EXIT_RUNTIME)
    return 0


def _run_loop(main) -> None:  # type: ignore[no-untyped-def]
    """uvloop when installed (more federated queries/s: bench/query.py), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _init_store(config, force: bool) -> int:  # type: ignore[no-untyped-def]
    from stimnetd.initstore import init_store

    if not force:
        return _fatal("init-store starts a new, empty store for this node (ε spent and the "
                      "audit chain start again); pass --force to do it", EXIT_CONFIG)
    print(asyncio.run(init_store(config)))
    return 0


async def _backup(config, dest: Path) -> int:  # type: ignore[no-untyped-def]
    from stimnetd.store.opening import site_store

    store = site_store(config)
    await store.open()
    try:
        await store.backup(dest)
    finally:
        await store.close()
    print(f"backed up {store.where} to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
