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


# protobuf's JSON mapping writes 64-bit integers as strings; stimctl's JSON is for scripts
# (jq, pandas), which expect numbers. Counts a node may show as "< k" (catalog subjects,
# table rows) are numbers when they are numbers, and the string otherwise.
_INT64 = {3, 4, 6, 16, 18}  # FieldDescriptor.TYPE_INT64, UINT64, FIXED64, SFIXED64, SINT64
_COUNT_STRINGS = frozenset({"subjects", "rows"})


def message_dict(msg: Any) -> dict[str, Any]:
    """A protobuf message as JSON-ready data, with numbers as numbers."""
    from google.protobuf.json_format import MessageToDict

    return _numbers(msg.DESCRIPTOR, MessageToDict(msg, preserving_proto_field_name=True))


def _numbers(descriptor: Any, data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    for f in descriptor.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                vf = f.message_type.fields_by_name["value"]
                data[f.name] = {k: _scalar(vf, v) if vf.message_type is None
                                else _numbers(vf.message_type, v) for k, v in value.items()}
            elif isinstance(value, list):
                data[f.name] = [_numbers(f.message_type, v) for v in value]
            else:
                data[f.name] = _numbers(f.message_type, value)
        elif isinstance(value, list):
            data[f.name] = [_scalar(f, v) for v in value]
        else:
            data[f.name] = _scalar(f, value)
    return data


def _scalar(f: Any, value: Any) -> Any:
    if f.type in _INT64 and isinstance(value, str):
        return int(value)
    if f.name in _COUNT_STRINGS and isinstance(value, str) and value.isdigit():
        return int(value)
    return value
