"""Reading one TOML value: its type, range, path or address, with errors that name the
file, the key and the rule."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration problem, phrased for the operator who has to fix it."""


class Reader:
    """Reads values out of one config file's tables; relative paths resolve against the
    file's directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {problem}")

    def table(self, raw: dict[str, Any], where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table")
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
        return raw

    def get(self, raw: dict[str, Any], where: str, key: str, kind: type | tuple[type, ...],
            default: Any = ..., *, choices: tuple[str, ...] | None = None) -> Any:
        if key not in raw:
            if default is ...:
                raise self.fail(where, f"missing required key {key!r}")
            return default
        value = raw[key]
        # bool is an int in Python; a port of `true` is a mistake, not 1.
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            raise self.fail(f"{where}.{key}", f"expected {_kind_name(kind)}, got a boolean")
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise self.fail(f"{where}.{key}", f"expected {_kind_name(kind)}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"{where}.{key}", "must be a finite number")
        if choices is not None and value not in choices:
            raise self.fail(f"{where}.{key}", f"{value!r} is not one of {', '.join(choices)}")
        return value

    def limit(self, raw: dict[str, Any], where: str, key: str, default: int) -> int:
        """An integer limit (connections, calls, jobs in flight): 1 to 100,000."""
        value = self.get(raw, where, key, int, default)
        if not 1 <= value <= 100_000:
            raise self.fail(f"{where}.{key}", f"must be between 1 and 100000, got {value}")
        return int(value)

    def path_of(self, value: str, where: str, *, must_exist: bool = True) -> Path:
        p = Path(value)
        p = p if p.is_absolute() else self.base / p
        if must_exist and not p.exists():
            raise self.fail(where, f"file {p} does not exist")
        return p

    def readable_file(self, raw: dict[str, Any], where: str, key: str) -> Path:
        p = self.path_of(self.get(raw, where, key, str), f"{where}.{key}")
        if not p.is_file():
            raise self.fail(f"{where}.{key}", f"{p} is not a regular file")
        try:
            with p.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise self.fail(f"{where}.{key}", f"{p} is not readable ({exc.strerror})") from None
        return p

    def address(self, value: str, where: str, *, allow_zero_port: bool = True) -> tuple[str, int]:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise self.fail(where, f"{value!r} is not HOST:PORT")
        try:
            port = int(port_s)
        except ValueError:
            raise self.fail(where, f"port {port_s!r} is not a number") from None
        if not (0 if allow_zero_port else 1) <= port <= 65535:
            raise self.fail(where, f"port {port} is out of range 1-65535")
        host = host.strip("[]")
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if not all(part.isalnum() or "-" in part for part in host.split(".")):
                    raise self.fail(where, f"{host!r} is not a valid host") from None
        return host, port

    def addresses(self, raw: dict[str, Any], where: str, key: str) -> tuple[str, ...]:
        values = self.get(raw, where, key, list, [])
        for v in values:
            if not isinstance(v, str):
                raise self.fail(f"{where}.{key}", "must be a list of HOST:PORT strings")
            self.address(v, f"{where}.{key}", allow_zero_port=False)
        return tuple(values)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
