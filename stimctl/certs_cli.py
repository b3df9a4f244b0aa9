"""`stimctl certs`: create the federation CA, issue, list, renew and revoke certificates.

Thin on purpose: parse, call :mod:`stimnet.pki`, print. A PkiError becomes one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from stimnet import pki

EXIT_OK = 0
EXIT_ERROR = 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `certs` command (and its sub-commands) to a stimctl sub-parser set."""
    certs = subparsers.add_parser(
        "certs",
        help="manage the federation CA and certificates",
        description="Manage the federation CA, node and user certificates, and the CRL.",
    )
    sub = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-ca", help="create a new federation CA in DIR")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--name", default="StimNet Federation CA", help="CA common name")
    p.add_argument("--days", type=_positive_int, default=3650, help="CA validity in days")
    p.set_defaults(func=_wrap(_init_ca))

    p = sub.add_parser("issue", help="generate a key and issue a certificate")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    p.add_argument("--name", required=True, help="identity name, e.g. site-a or alice")
    p.add_argument("--role", required=True, choices=pki.ROLES)
    p.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="DNS name or IP address the node serves on (node role; repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--days", type=_positive_int, default=397, help="validity in days")
    p.set_defaults(func=_wrap(_issue))

    p = sub.add_parser("revoke", help="revoke by serial or by name and rewrite the CRL")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    p.add_argument("target", metavar="SERIAL_OR_NAME", help="decimal or 0x-hex serial, or name")
    p.set_defaults(func=_wrap(_revoke))

    p = sub.add_parser("list", help="list every certificate the CA has issued")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    # SUPPRESS: `stimctl --json certs list` (the global flag) must not be reset to False.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable output")
    p.set_defaults(func=_wrap(_list))

    p = sub.add_parser("renew", help="new key and certificate with the same identity")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    p.add_argument("cert", type=Path, metavar="CERT", help="the certificate to renew")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: next to CERT")
    p.add_argument("--days", type=_positive_int, default=397, help="validity in days")
    p.set_defaults(func=_wrap(_renew))

    p = sub.add_parser("refresh-crl", help="re-sign the CRL before its next-update passes")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    p.add_argument("--days", type=_positive_int, default=pki.CRL_DAYS, help="CRL validity")
    p.set_defaults(func=_wrap(_refresh_crl))
    return certs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _wrap(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except pki.PkiError as exc:
            print(f"stimctl: error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    run.__name__ = command.__name__.lstrip("_")
    run.__doc__ = command.__doc__
    return run


def _init_ca(args: argparse.Namespace) -> int:
    """Create the CA."""
    cert = pki.init_ca(args.dir, common_name=args.name, days=args.days)
    print(f"created CA {args.name!r} in {args.dir}")
    print(f"  certificate: {cert}")
    print(f"  private key: {args.dir / pki.CA_KEY}  (keep offline; never commit it)")
    print(f"  CRL:         {args.dir / pki.CRL_FILE}")
    return EXIT_OK


def _issue(args: argparse.Namespace) -> int:
    """Issue one certificate."""
    issued = pki.issue(
        args.ca, args.name, args.role, args.out, hosts=tuple(args.hosts), days=args.days
    )
    print(f"issued {args.role}/{args.name} serial {pki.serial_hex(issued.serial)}")
    print(f"  certificate: {issued.cert_path}")
    print(f"  private key: {issued.key_path}")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    """Revoke and rewrite the CRL."""
    serials = pki.revoke(args.ca, args.target)
    for serial in serials:
        print(f"revoked {pki.serial_hex(serial)}")
    print(f"CRL updated: {args.ca / pki.CRL_FILE} (publish it to every node)")
    return EXIT_OK


def _refresh_crl(args: argparse.Namespace) -> int:
    """Re-sign the CRL."""
    path = pki.refresh_crl(args.ca, days=args.days)
    print(f"CRL re-signed: {path} (publish it to every node)")
    return EXIT_OK


def _renew(args: argparse.Namespace) -> int:
    """Renew one certificate."""
    issued = pki.renew(args.ca, args.cert, args.out, days=args.days)
    print(f"renewed: new serial {pki.serial_hex(issued.serial)}")
    print(f"  certificate: {issued.cert_path}")
    print(f"  private key: {issued.key_path}")
    print("  the previous pair was kept as *.bak-<old serial>; the old certificate stays valid")
    return EXIT_OK


def _status(record: pki.CertRecord, now: datetime) -> str:
    if record.revoked:
        return "revoked"
    if now > record.not_after:
        return "expired"
    return "valid"


def _list(args: argparse.Namespace) -> int:
    """Print the CA's registry."""
    records = pki.list_certs(args.ca)
    now = datetime.now(UTC)
    if getattr(args, "json", False):
        rows = [
            {
                # Decimal string: ~128-bit serials do not survive float-based JSON parsers.
                "serial": str(r.serial),
                "serial_hex": pki.serial_hex(r.serial),
                "name": r.name,
                "role": r.role,
                "hosts": list(r.hosts),
                "not_before": r.not_before.isoformat(),
                "not_after": r.not_after.isoformat(),
                "revoked": r.revoked,
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                "status": _status(r, now),
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    header = ("NAME", "ROLE", "SERIAL", "NOT AFTER", "STATUS", "HOSTS")
    table = [header] + [
        (
            r.name,
            r.role,
            pki.serial_hex(r.serial),
            r.not_after.strftime("%Y-%m-%d %H:%M"),
            _status(r, now),
            ",".join(r.hosts) or "-",
        )
        for r in records
    ]
    # Plain aligned columns rather than a rich table: the output is grepped and piped, and
    # rich wraps long serials to the terminal width.
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
    return EXIT_OK
