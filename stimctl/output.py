"""How stimctl prints: rich tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def console() -> Console:
    return Console(soft_wrap=False, highlight=False)


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def plain(value: Any) -> Text:
    """Data as text, never as rich markup: a level, alias or peer's detail reading
    "[/bold]" would raise MarkupError, and "[x]" would vanish."""
    return Text("" if value is None else str(value))


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=plain(title), title_justify="left")
    for h in headers:
        t.add_column(plain(h))
    for r in rows:
        t.add_row(*[plain(v) for v in r])
    console().print(t)


def kv(title: str, pairs: Sequence[tuple[str, Any]]) -> None:
    t = Table(title=plain(title), title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in pairs:
        t.add_row(plain(k), plain(v))
    console().print(t)


def ago(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    d = max(time.time() - seconds, 0)
    return f"{d:.1f}s ago" if d < 120 else f"{d / 60:.0f}m ago"


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600}h {s % 3600 // 60}m {s % 60}s"


def parse_since(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise SystemExit(f"stimctl: error: --since {text!r} is neither unix seconds nor an "
                         "ISO date") from None
