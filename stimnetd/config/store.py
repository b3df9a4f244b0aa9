"""[store]: where the node's durable state lives (a SQLite file in the state directory by
default, or a PostgreSQL database shared by the site's replicas)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from stimnetd.config.reader import Reader

SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class StoreSettings:
    # postgresql://user[:password]@host[:port]/database: several replicas of one site
    # (one node name and certificate) share it. None: stimnetd.sqlite3 in [node].state_dir.
    # Kept out of repr: the password must not reach a log.
    url: str | None = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        """The url without its password (for logs and messages)."""
        if self.url is None:
            return "SQLite in the state directory"
        return redact(self.url)


def redact(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "(an unparsable URL)"
    if password is None:
        return url
    return url.replace(f":{password}@", ":***@", 1)


def read_store(r: Reader, raw: dict[str, Any]) -> StoreSettings:
    w = "[store]"
    raw = r.table(raw, w, {"url"})
    url = r.get(raw, w, "url", str, None)
    if url is None:
        return StoreSettings()
    where = f"{w}.url"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise r.fail(where, f"{redact(url)} is not a URL ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise r.fail(where, f"{redact(url)} is not a postgresql://USER@HOST[:PORT]/DATABASE "
                            "URL (leave [store] out for the SQLite store in the state "
                            "directory)")
    if not parts.hostname:
        raise r.fail(where, f"{redact(url)} names no host")
    if not parts.username:
        raise r.fail(where, f"{redact(url)} names no user")
    if not parts.path.strip("/"):
        raise r.fail(where, f"{redact(url)} names no database (…/DATABASE)")
    if port == 0:
        raise r.fail(where, f"{redact(url)} has port 0")
    return StoreSettings(url=url)
