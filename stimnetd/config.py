"""Node configuration: frozen dataclasses loaded from TOML. All validation lives here.

Every problem is a `ConfigError` whose message names the file, the key and the rule, so
`stimnetd` can exit with one clear line. Relative paths are resolved against the
directory of the config file, so a site directory can be moved as a whole.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stimnet.pki import PkiError, check_name
from stimnet.query.fields import FIELD_TYPES, FieldMeta

DP_POLICIES = ("off", "optional", "required")
SCRIPT_POLICIES = ("auto", "review", "deny")
LOG_POLICIES = ("none", "errors", "full")
DECLARED_OUTPUTS = ("required", "optional")
RESTART_POLICIES = ("interrupt", "requeue")
TLS_TERMINATORS = ("stimnet", "grpc")


class ConfigError(Exception):
    """A configuration problem, phrased for the operator who has to fix it."""


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None
    # Who terminates client TLS: "stimnet" (our TLS front: every caller gets a gRPC status
    # and an audit entry) or "grpc" (gRPC's own TLS: faster, but callers without a valid
    # certificate are cut off in the handshake, unaudited). See stimnetd/tlsfront.py.
    terminate: str = "stimnet"
    # The front's bounds on connections that have not finished their TLS handshake.
    handshake_timeout_s: float = 10.0
    max_handshakes: int = 256
    max_handshakes_per_host: int = 32
    # Refused calls (unauthenticated, revoked, wrong role) audited one by one per source
    # per minute; the rest are counted into one entry (stimnetd/rpc/refusals.py).
    refusals_audited_per_minute: int = 20


@dataclass(frozen=True)
class NodeSettings:
    name: str
    host: str
    port: int
    advertise: str | None
    state_dir: Path
    k_min: int = 5
    grace_s: float = 10.0
    # Bounds how long a connection may live, so a revoked client cannot keep a channel.
    max_connection_age_s: float = 300.0
    # Finished jobs (their signed requests and answers) are deleted this long after they
    # finished; 0 keeps them forever. Releases, the ledger, cohorts and audit are kept.
    job_retention_days: float = 90.0
    # Queries one researcher may have running at once with this node as their entry (each
    # fans out to every site holding the catalog): a runaway notebook loop waits its turn.
    max_queries_per_researcher: int = 32


@dataclass(frozen=True)
class PrivacySettings:
    dp: str = "off"
    default_epsilon: float = 1.0
    max_epsilon_per_query: float = 5.0
    budget_epsilon: float = 10.0
    overlap_guard: bool = True


@dataclass(frozen=True)
class FederationSettings:
    peers: tuple[str, ...] = ()
    seeds: tuple[str, ...] = ()
    subjob_timeout_s: float = 30.0
    # Signed jobs older than this (or from this far in the future) are refused as stale.
    request_max_age_s: float = 300.0
    # Sub-jobs one entry node may have running here at once (all its researchers').
    max_subjobs_per_entry: int = 256


@dataclass(frozen=True)
class GossipSettings:
    enabled: bool = True
    profile: str = "lan"
    gossip_interval_s: float | None = None
    probe_interval_s: float | None = None
    probe_timeout_s: float | None = None
    suspicion_mult: int | None = None
    indirect_checks: int | None = None
    fanout: int | None = None


@dataclass(frozen=True)
class ScriptSettings:
    policy: str = "review"
    log_policy: str = "errors"
    # "required": a script job must declare its outputs (names, functions, fields, edges,
    # GROUP BY) in the signed request, and its result must be exactly that; "optional":
    # undeclared scripts run too (their output names and edges are a channel past k_min).
    declared_outputs: str = "required"
    concurrency: int = 1
    image: str = "stimnet-sandbox"
    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 64
    timeout_s: float = 300.0
    result_mb: int = 8
    on_restart: str = "interrupt"
    # Pre-started containers per catalog (policy auto only); 0 turns them off on small hosts.
    warm_containers: int = 2
    # Script jobs one researcher may have queued, running or awaiting approval here (each
    # keeps its script, up to 1 MiB, in the store until it ends).
    max_pending_per_researcher: int = 16


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = None  # "127.0.0.1:9464"; None = off


@dataclass(frozen=True)
class CatalogConfig:
    name: str
    description: str
    root: Path
    subject_key: str
    schema_version: int
    tables: dict[str, Path]
    rois: dict[str, Path]
    fields: dict[str, FieldMeta]


@dataclass(frozen=True)
class Config:
    source: Path
    node: NodeSettings
    tls: TlsConfig
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    gossip: GossipSettings = field(default_factory=GossipSettings)
    scripts: ScriptSettings = field(default_factory=ScriptSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    catalogs: tuple[CatalogConfig, ...] = ()
    log_level: str = "info"


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return _Parser(path).config(raw)


class _Parser:
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

    def config(self, raw: dict[str, Any]) -> Config:
        raw = self.table(raw, "top level", {"node", "tls", "privacy", "federation", "gossip",
                                            "scripts", "metrics", "catalogs", "logging"})
        if "node" not in raw:
            raise self.fail("top level", "missing required table [node]")
        if "tls" not in raw:
            raise self.fail("top level", "missing required table [tls]")
        catalogs_raw = raw.get("catalogs", [])
        if not isinstance(catalogs_raw, list):
            raise self.fail("catalogs", "must be an array of tables ([[catalogs]])")
        catalogs = tuple(self.catalog(c, f"catalogs[{i}]") for i, c in enumerate(catalogs_raw))
        names = [c.name for c in catalogs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise self.fail("catalogs", f"catalog {dupes[0]!r} is declared twice")
        logging_raw = self.table(raw.get("logging", {}), "logging", {"level"})
        return Config(
            source=self.path,
            node=self.node(raw["node"]),
            tls=self.tls(raw["tls"]),
            privacy=self.privacy(raw.get("privacy", {})),
            federation=self.federation(raw.get("federation", {})),
            gossip=self.gossip(raw.get("gossip", {})),
            scripts=self.scripts(raw.get("scripts", {})),
            metrics=self.metrics(raw.get("metrics", {})),
            catalogs=catalogs,
            log_level=self.get(logging_raw, "logging", "level", str, "info",
                               choices=("debug", "info", "warning", "error")),
        )

    def node(self, raw: dict[str, Any]) -> NodeSettings:
        w = "[node]"
        raw = self.table(raw, w, {"name", "listen", "advertise", "state_dir", "k_min",
                                  "grace_s", "max_connection_age_s", "job_retention_days",
                                  "max_queries_per_researcher"})
        name = self.get(raw, w, "name", str)
        try:
            check_name(name)
        except PkiError as exc:
            raise self.fail(f"{w}.name", str(exc)) from None
        host, port = self.address(self.get(raw, w, "listen", str), f"{w}.listen")
        # Without `advertise`, peers are told host:bound-port once the server listens.
        advertise = self.get(raw, w, "advertise", str, None) if "advertise" in raw else None
        if advertise is not None:
            self.address(advertise, f"{w}.advertise", allow_zero_port=False)
        k_min = self.get(raw, w, "k_min", int, 5)
        if not 1 <= k_min <= 1000:
            raise self.fail(f"{w}.k_min", f"must be between 1 and 1000, got {k_min}")
        grace = self.get(raw, w, "grace_s", float, 10.0)
        age = self.get(raw, w, "max_connection_age_s", float, 300.0)
        if grace <= 0 or age <= 0:
            raise self.fail(w, "grace_s and max_connection_age_s must be positive")
        retention = self.get(raw, w, "job_retention_days", float, 90.0)
        if retention < 0:
            raise self.fail(f"{w}.job_retention_days",
                            f"must be 0 (keep finished jobs forever) or more, got {retention:g}")
        return NodeSettings(
            name=name, host=host, port=port, advertise=advertise,
            max_queries_per_researcher=self.limit(raw, w, "max_queries_per_researcher", 32),
            state_dir=self.path_of(self.get(raw, w, "state_dir", str, "state"), f"{w}.state_dir",
                                   must_exist=False),
            k_min=k_min, grace_s=grace, max_connection_age_s=age, job_retention_days=retention,
        )

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

    def tls(self, raw: dict[str, Any]) -> TlsConfig:
        w = "[tls]"
        raw = self.table(raw, w, {"ca", "cert", "key", "crl", "terminate", "handshake_timeout_s",
                                  "max_handshakes", "max_handshakes_per_host",
                                  "refusals_audited_per_minute"})
        crl = self.readable_file(raw, w, "crl") if "crl" in raw else None
        timeout = self.get(raw, w, "handshake_timeout_s", float, 10.0)
        if not 0.1 <= timeout <= 300:
            raise self.fail(f"{w}.handshake_timeout_s", "must be between 0.1 and 300 seconds")
        limits = {key: self.limit(raw, w, key, default)
                  for key, default in (("max_handshakes", 256), ("max_handshakes_per_host", 32),
                                       ("refusals_audited_per_minute", 20))}
        return TlsConfig(ca=self.readable_file(raw, w, "ca"), cert=self.readable_file(raw, w, "cert"),
                         key=self.readable_file(raw, w, "key"), crl=crl,
                         terminate=self.get(raw, w, "terminate", str, "stimnet",
                                            choices=TLS_TERMINATORS),
                         handshake_timeout_s=timeout, **limits)

    def privacy(self, raw: dict[str, Any]) -> PrivacySettings:
        w = "[privacy]"
        raw = self.table(raw, w, {"dp", "default_epsilon", "max_epsilon_per_query",
                                  "budget_epsilon", "overlap_guard"})
        p = PrivacySettings(
            dp=self.get(raw, w, "dp", str, "off", choices=DP_POLICIES),
            default_epsilon=self.get(raw, w, "default_epsilon", float, 1.0),
            max_epsilon_per_query=self.get(raw, w, "max_epsilon_per_query", float, 5.0),
            budget_epsilon=self.get(raw, w, "budget_epsilon", float, 10.0),
            overlap_guard=self.get(raw, w, "overlap_guard", bool, True),
        )
        for key in ("default_epsilon", "max_epsilon_per_query", "budget_epsilon"):
            if getattr(p, key) <= 0:
                raise self.fail(f"{w}.{key}", "must be positive")
        if p.default_epsilon > p.max_epsilon_per_query:
            raise self.fail(f"{w}.default_epsilon", "exceeds max_epsilon_per_query")
        return p

    def federation(self, raw: dict[str, Any]) -> FederationSettings:
        w = "[federation]"
        raw = self.table(raw, w, {"peers", "seeds", "subjob_timeout_s", "request_max_age_s",
                                  "max_subjobs_per_entry"})
        peers = self.addresses(raw, w, "peers")
        seeds = self.addresses(raw, w, "seeds")
        timeout = self.get(raw, w, "subjob_timeout_s", float, 30.0)
        age = self.get(raw, w, "request_max_age_s", float, 300.0)
        if timeout <= 0 or age <= 0:
            raise self.fail(w, "subjob_timeout_s and request_max_age_s must be positive")
        return FederationSettings(
            peers=peers, seeds=seeds, subjob_timeout_s=timeout, request_max_age_s=age,
            max_subjobs_per_entry=self.limit(raw, w, "max_subjobs_per_entry", 256))

    def addresses(self, raw: dict[str, Any], where: str, key: str) -> tuple[str, ...]:
        values = self.get(raw, where, key, list, [])
        for v in values:
            if not isinstance(v, str):
                raise self.fail(f"{where}.{key}", "must be a list of HOST:PORT strings")
            self.address(v, f"{where}.{key}", allow_zero_port=False)
        return tuple(values)

    def gossip(self, raw: dict[str, Any]) -> GossipSettings:
        w = "[gossip]"
        raw = self.table(raw, w, {"enabled", "profile", "gossip_interval_s", "probe_interval_s",
                                  "probe_timeout_s", "suspicion_mult", "indirect_checks", "fanout"})
        values: dict[str, Any] = {}
        for key in ("gossip_interval_s", "probe_interval_s", "probe_timeout_s"):
            if key in raw:
                values[key] = self.get(raw, w, key, float)
                if values[key] <= 0:
                    raise self.fail(f"{w}.{key}", "must be positive")
        for key in ("suspicion_mult", "indirect_checks", "fanout"):
            if key in raw:
                values[key] = self.get(raw, w, key, int)
                if values[key] < 1:
                    raise self.fail(f"{w}.{key}", "must be at least 1")
        return GossipSettings(enabled=self.get(raw, w, "enabled", bool, True),
                              profile=self.get(raw, w, "profile", str, "lan", choices=("lan", "wan")),
                              **values)

    def scripts(self, raw: dict[str, Any]) -> ScriptSettings:
        w = "[scripts]"
        raw = self.table(raw, w, {"policy", "log_policy", "concurrency", "image", "memory_mb",
                                  "cpus", "pids", "timeout_s", "result_mb", "on_restart",
                                  "warm_containers", "declared_outputs",
                                  "max_pending_per_researcher"})
        s = ScriptSettings(
            policy=self.get(raw, w, "policy", str, "review", choices=SCRIPT_POLICIES),
            log_policy=self.get(raw, w, "log_policy", str, "errors", choices=LOG_POLICIES),
            declared_outputs=self.get(raw, w, "declared_outputs", str, "required",
                                      choices=DECLARED_OUTPUTS),
            concurrency=self.get(raw, w, "concurrency", int, 1),
            image=self.get(raw, w, "image", str, "stimnet-sandbox"),
            memory_mb=self.get(raw, w, "memory_mb", int, 512),
            cpus=self.get(raw, w, "cpus", float, 1.0),
            pids=self.get(raw, w, "pids", int, 64),
            timeout_s=self.get(raw, w, "timeout_s", float, 300.0),
            result_mb=self.get(raw, w, "result_mb", int, 8),
            on_restart=self.get(raw, w, "on_restart", str, "interrupt", choices=RESTART_POLICIES),
            warm_containers=self.get(raw, w, "warm_containers", int, 2),
            max_pending_per_researcher=self.limit(raw, w, "max_pending_per_researcher", 16),
        )
        if not 0 <= s.warm_containers <= 16:
            raise self.fail(f"{w}.warm_containers", "must be between 0 and 16")
        for key in ("concurrency", "memory_mb", "pids", "result_mb"):
            if getattr(s, key) < 1:
                raise self.fail(f"{w}.{key}", "must be at least 1")
        if s.cpus <= 0 or s.timeout_s <= 0:
            raise self.fail(w, "cpus and timeout_s must be positive")
        return s

    def metrics(self, raw: dict[str, Any]) -> MetricsSettings:
        w = "[metrics]"
        raw = self.table(raw, w, {"listen"})
        listen = self.get(raw, w, "listen", str, None) if "listen" in raw else None
        if listen is not None:
            self.address(listen, f"{w}.listen")
        return MetricsSettings(listen=listen)

    def catalog(self, raw: dict[str, Any], w: str) -> CatalogConfig:
        raw = self.table(raw, w, {"name", "description", "root", "subject_key", "schema_version",
                                  "tables", "rois", "fields"})
        name = self.get(raw, w, "name", str)
        w = f"catalog {name!r}"
        root = self.path_of(self.get(raw, w, "root", str), f"{w}.root").resolve()
        if not root.is_dir():
            raise self.fail(f"{w}.root", f"{root} is not a directory")
        tables_raw = self.table(self.get(raw, w, "tables", dict), f"{w}.tables",
                                set(self.get(raw, w, "tables", dict)))
        if not tables_raw:
            raise self.fail(f"{w}.tables", "at least one table is required")
        tables = {t: self.inside(root, rel, f"{w}.tables.{t}") for t, rel in tables_raw.items()}
        rois = {r: self.inside(root, rel, f"{w}.rois.{r}")
                for r, rel in self.get(raw, w, "rois", dict, {}).items()}
        fields_raw = self.get(raw, w, "fields", dict, {})
        fields = {f: self.field_meta(f, spec, f"{w}.fields.{f}", set(tables))
                  for f, spec in fields_raw.items()}
        subject_key = self.get(raw, w, "subject_key", str)
        version = self.get(raw, w, "schema_version", int, 1)
        return CatalogConfig(name=name, description=self.get(raw, w, "description", str, ""),
                             root=root, subject_key=subject_key, schema_version=version,
                             tables=tables, rois=rois, fields=fields)

    def inside(self, root: Path, rel: Any, where: str) -> Path:
        if not isinstance(rel, str):
            raise self.fail(where, "must be a path string relative to the catalog root")
        p = (root / rel).resolve()
        if not p.is_relative_to(root.resolve()):
            raise self.fail(where, f"path {rel!r} escapes the catalog root {root}")
        if not p.is_file():
            raise self.fail(where, f"{p} is not a file" if p.exists()
                            else f"file {p} does not exist")
        return p

    def field_meta(self, name: str, raw: Any, where: str, tables: set[str]) -> FieldMeta:
        raw = self.table(raw, where, {"table", "type", "unit", "description", "bounds", "levels",
                                      "max_voxels"})
        ftype = self.get(raw, where, "type", str, choices=FIELD_TYPES)
        table = self.get(raw, where, "table", str)
        if table not in tables:
            raise self.fail(f"{where}.table", f"table {table!r} is not declared in tables")
        bounds = None
        if "bounds" in raw:
            b = raw["bounds"]
            if (not isinstance(b, list) or len(b) != 2
                    or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in b)
                    or not all(math.isfinite(x) for x in b) or not b[0] < b[1]):
                raise self.fail(f"{where}.bounds", "must be [lower, upper] with lower < upper")
            if ftype not in ("numeric", "integer"):
                raise self.fail(f"{where}.bounds", f"bounds only apply to numeric fields, not {ftype}")
            bounds = (float(b[0]), float(b[1]))
        levels = None
        if "levels" in raw:
            lv = raw["levels"]
            if not isinstance(lv, list) or not lv or not all(isinstance(x, str) for x in lv):
                raise self.fail(f"{where}.levels", "must be a non-empty list of strings")
            if ftype != "categorical":
                raise self.fail(f"{where}.levels", "levels only apply to categorical fields")
            levels = tuple(lv)
        max_voxels = self.get(raw, where, "max_voxels", int, None) if "max_voxels" in raw else None
        return FieldMeta(name=name, table=table, type=ftype, unit=self.get(raw, where, "unit", str, ""),
                         description=self.get(raw, where, "description", str, ""),
                         bounds=bounds, levels=levels, max_voxels=max_voxels)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
