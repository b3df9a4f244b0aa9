"""The whole node configuration: the file's top level, its sections, and `load_config`."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stimnetd.config.catalogs import CatalogConfig, read_catalog
from stimnetd.config.compute import ComputeSettings, read_compute
from stimnetd.config.federation import FederationSettings, GossipSettings, read_federation, read_gossip
from stimnetd.config.network import (
    MetricsSettings,
    NodeSettings,
    TlsConfig,
    read_metrics,
    read_node,
    read_tls,
)
from stimnetd.config.policy import PrivacySettings, ScriptSettings, read_privacy, read_scripts
from stimnetd.config.reader import ConfigError, Reader
from stimnetd.config.storage import StorageSettings, read_storage
from stimnetd.config.store import StoreSettings, read_store


@dataclass(frozen=True)
class Config:
    source: Path
    node: NodeSettings
    tls: TlsConfig
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    gossip: GossipSettings = field(default_factory=GossipSettings)
    scripts: ScriptSettings = field(default_factory=ScriptSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
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
    return _read_config(Reader(path), raw)


def _read_config(r: Reader, raw: dict[str, Any]) -> Config:
    raw = r.table(raw, "top level", {"node", "tls", "privacy", "federation", "gossip",
                                     "scripts", "metrics", "catalogs", "logging",
                                     "compute", "storage", "store"})
    if "node" not in raw:
        raise r.fail("top level", "missing required table [node]")
    if "tls" not in raw:
        raise r.fail("top level", "missing required table [tls]")
    catalogs_raw = raw.get("catalogs", [])
    if not isinstance(catalogs_raw, list):
        raise r.fail("catalogs", "must be an array of tables ([[catalogs]])")
    catalogs = tuple(read_catalog(r, c, f"catalogs[{i}]") for i, c in enumerate(catalogs_raw))
    names = [c.name for c in catalogs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise r.fail("catalogs", f"catalog {dupes[0]!r} is declared twice")
    logging_raw = r.table(raw.get("logging", {}), "logging", {"level"})
    return Config(
        source=r.path,
        node=read_node(r, raw["node"]),
        tls=read_tls(r, raw["tls"]),
        privacy=read_privacy(r, raw.get("privacy", {})),
        federation=read_federation(r, raw.get("federation", {})),
        gossip=read_gossip(r, raw.get("gossip", {})),
        scripts=read_scripts(r, raw.get("scripts", {})),
        compute=read_compute(r, raw.get("compute", {})),
        metrics=read_metrics(r, raw.get("metrics", {})),
        storage=read_storage(r, raw.get("storage", {})),
        store=read_store(r, raw.get("store", {})),
        catalogs=catalogs,
        log_level=r.get(logging_raw, "logging", "level", str, "info",
                        choices=("debug", "info", "warning", "error")),
    )
