"""[store] url: absent means the SQLite store in the state directory; a PostgreSQL URL is
checked with one clear line, and its password never appears in a message or repr."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import tomli_w

from stimnetd.config import ConfigError, load_config
from stimnetd.store import Store
from stimnetd.store.opening import site_store
from stimnetd.store.pg import PgStore
from stimnetd.store.pg_sync import UntranslatedStatement, translate
from stimnetd.testing import CertFactory, write_node_config

SECRET = "s3cr3t-pw"


@pytest.fixture
def site(tmp_path: Path, pki: CertFactory, small_catalog_root: Path,
         small_catalog: dict) -> Path:
    root = tmp_path / "catalog"
    shutil.copytree(small_catalog_root, root)
    return write_node_config(tmp_path / "site", pki.issue("node-a", "node"), "node-a",
                             port=7001, catalogs=[{**small_catalog, "root": str(root)}])


def _with_store(path: Path, store: dict) -> Path:
    raw = tomllib.loads(path.read_text())
    path.write_text(tomli_w.dumps({**raw, "store": store}))
    return path


def test_no_store_section_keeps_the_sqlite_file_in_the_state_dir(site: Path) -> None:
    """Without [store] the node opens stimnetd.sqlite3 in its state directory."""
    config = load_config(site)
    store = site_store(config)
    assert config.store.url is None
    assert isinstance(store, Store) and store.path == config.node.state_dir / "stimnetd.sqlite3"


def test_a_postgresql_url_opens_the_shared_store_without_showing_its_password(
        site: Path) -> None:
    """A postgresql:// URL makes the node's store a PgStore with this replica's state dir;
    neither the settings' repr nor the store's name carries the password."""
    config = load_config(_with_store(site, {"url": f"postgresql://stim:{SECRET}@db:5432/site"}))
    store = site_store(config)
    assert isinstance(store, PgStore) and store.state_dir == config.node.state_dir
    assert SECRET not in repr(config) and SECRET not in store.where
    assert store.where == "PostgreSQL store postgresql://stim:***@db:5432/site"


@pytest.mark.parametrize(("url", "problem"), [
    ("mysql://stim@db/site", "is not a postgresql://"),
    (f"postgresql://stim:{SECRET}@/site", "names no host"),
    (f"postgresql://:{SECRET}@db/site", "names no user"),
    (f"postgresql://stim:{SECRET}@db:5432", "names no database"),
    (f"postgresql://stim:{SECRET}@db:99999/site", "is not a URL"),
])
def test_a_bad_url_is_refused_in_one_line_without_its_password(site: Path, url: str,
                                                               problem: str) -> None:
    """Each malformed URL is refused naming [store].url and the rule, password hidden."""
    with pytest.raises(ConfigError) as err:
        load_config(_with_store(site, {"url": url}))
    message = str(err.value)
    assert "[store].url" in message and problem in message
    assert SECRET not in message and "\n" not in message


def test_an_unknown_store_key_is_refused(site: Path) -> None:
    """[store] takes url only."""
    with pytest.raises(ConfigError, match=r"\[store\]: unknown key 'path'"):
        load_config(_with_store(site, {"path": "/x"}))


def test_the_guards_sqlite_statements_have_one_postgresql_form() -> None:
    """Placeholders are numbered, the two upserts become ON CONFLICT, the linear history's
    order is its id; any other SQLite-only form is refused, not passed through."""
    assert translate("SELECT a FROM t WHERE x = ? AND y IN (?,?)") == \
        "SELECT a FROM t WHERE x = $1 AND y IN ($2,$3)"
    assert translate("INSERT OR REPLACE INTO cohort_sketches (a) VALUES (?)").endswith(
        "ON CONFLICT (researcher, catalog, digest) DO UPDATE SET sketch = EXCLUDED.sketch")
    assert translate("INSERT OR IGNORE INTO cohort_families (a) VALUES (?)").endswith(
        "ON CONFLICT (researcher, catalog, digest) DO NOTHING")
    assert translate("SELECT 1 FROM linear_cohorts l ORDER BY l.rowid") == \
        "SELECT 1 FROM linear_cohorts l ORDER BY l.id"
    for sqlite_only in ("INSERT OR REPLACE INTO approvals (a) VALUES (?)",
                        "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs)",
                        "PRAGMA user_version"):
        with pytest.raises(UntranslatedStatement):
            translate(sqlite_only)
