"""Node configuration: frozen dataclasses loaded from TOML. All validation lives here.

Every problem is a `ConfigError` whose message names the file, the key and the rule, so
`stimnetd` can exit with one clear line. Relative paths are resolved against the
directory of the config file, so a site directory can be moved as a whole.

One module per part of the file: ``network`` ([node], [tls], [metrics]), ``federation``
([federation], [gossip]), ``policy`` ([privacy], [scripts]), ``catalogs`` ([[catalogs]]),
``storage`` ([storage]), ``store`` ([store]), ``load`` (the top level and `load_config`); ``reader`` reads
and checks single values.
Callers use the names re-exported here.
"""

from stimnetd.config.catalogs import CatalogConfig
from stimnetd.config.federation import FederationSettings, GossipSettings
from stimnetd.config.load import Config, load_config
from stimnetd.config.network import TLS_TERMINATORS, MetricsSettings, NodeSettings, TlsConfig
from stimnetd.config.policy import (
    DECLARED_OUTPUTS,
    DP_POLICIES,
    LOG_POLICIES,
    RESTART_POLICIES,
    SCRIPT_POLICIES,
    BlockSplit,
    PrivacySettings,
    ScriptSettings,
)
from stimnetd.config.reader import ConfigError
from stimnetd.config.storage import StorageSettings
from stimnetd.config.store import StoreSettings

__all__ = [
    "DECLARED_OUTPUTS",
    "DP_POLICIES",
    "LOG_POLICIES",
    "RESTART_POLICIES",
    "SCRIPT_POLICIES",
    "TLS_TERMINATORS",
    "BlockSplit",
    "CatalogConfig",
    "Config",
    "ConfigError",
    "FederationSettings",
    "GossipSettings",
    "MetricsSettings",
    "NodeSettings",
    "PrivacySettings",
    "ScriptSettings",
    "StorageSettings",
    "StoreSettings",
    "TlsConfig",
    "load_config",
]
