"""The PKI's vocabulary: its one error, the roles, identity names, serials and times.

Every other module of the package builds on these; they hold no key and touch no file.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

ROLES = ("node", "researcher", "admin")
URI_SCHEME = "stimnet"

# Certificates start a few minutes in the past so that a peer whose clock runs slightly
# behind the CA's does not reject a certificate issued moments ago.
BACKDATE = timedelta(minutes=5)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class PkiError(Exception):
    """A certificate, key, CRL or CA directory problem, with a one-line message."""


def check_name(name: str) -> str:
    """Return `name` if it is a valid identity name, else raise PkiError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PkiError(
            f"invalid identity name {name!r}: use 1-63 characters of a-z, 0-9, '.', '_', '-',"
            " starting with a letter or digit"
        )
    return name


def check_role(role: str) -> str:
    """Return `role` if it is one of ROLES, else raise PkiError."""
    if role not in ROLES:
        raise PkiError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return role


def serial_hex(serial: int) -> str:
    """The display form of a serial, which revoke() also accepts."""
    return f"0x{serial:x}"


def fmt_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> datetime:
    # X.509 times have one-second resolution; truncating keeps the index equal to the cert.
    return datetime.now(UTC).replace(microsecond=0)
