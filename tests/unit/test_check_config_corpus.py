"""`stimnetd check-config` over a corpus of broken configs: each is refused with exit 2 and
one line naming the file, the key and the rule, never a traceback; configs that are valid
but probably not meant pass with a one-line warning naming the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tomli_w

from stimnetd.__main__ import main
from stimnetd.testing import CertFactory, foreign, write_node_config

Edit = Callable[[dict[str, Any], Path, CertFactory], None]


@pytest.fixture
def site(tmp_path: Path, pki: CertFactory, small_catalog_root: Path,
         small_catalog: dict) -> Path:
    root = tmp_path / "catalog"
    shutil.copytree(small_catalog_root, root)
    return write_node_config(tmp_path / "site", pki.issue("node-a", "node"), "node-a",
                             port=7001, catalogs=[{**small_catalog, "root": str(root)}],
                             crl=pki.crl_path, scripts={"policy": "deny"})


def _set(section: str, key: str, value: Any) -> Edit:
    def edit(cfg: dict[str, Any], tmp: Path, pki: CertFactory) -> None:
        cfg.setdefault(section, {})[key] = value
    return edit


def _drop(section: str, key: str) -> Edit:
    def edit(cfg: dict[str, Any], tmp: Path, pki: CertFactory) -> None:
        del cfg[section][key]
    return edit


def _field(name: str, key: str, value: Any) -> Edit:
    def edit(cfg: dict[str, Any], tmp: Path, pki: CertFactory) -> None:
        cfg["catalogs"][0]["fields"][name][key] = value
    return edit


def _tls_file(key: str, make: Callable[[CertFactory, Path], Path]) -> Edit:
    def edit(cfg: dict[str, Any], tmp: Path, pki: CertFactory) -> None:
        cfg["tls"][key] = str(make(pki, tmp))
    return edit


def _pair(name: str, role: str) -> Edit:
    def edit(cfg: dict[str, Any], tmp: Path, pki: CertFactory) -> None:
        certs = pki.issue(name, role)
        cfg["tls"].update(cert=str(certs.cert), key=str(certs.key))
    return edit


def _table(name: str, column: str, value: str) -> Edit:
    def edit(cfg: dict[str, Any], tmp: Path, pki: CertFactory) -> None:
        p = Path(cfg["catalogs"][0]["root"]) / f"{name}.csv"
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        df.loc[1, column] = value
        df.to_csv(p, index=False)
    return edit


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


BROKEN: dict[str, tuple[Edit, str]] = {  # case: (edit, what the one line must name)
    "unknown top-level table": (lambda c, t, p: c.update(nodes={}), "top level: unknown key 'nodes'"),
    "node name missing": (_drop("node", "name"), "[node]: missing required key 'name'"),
    "k_min a string": (_set("node", "k_min", "five"), "[node].k_min: expected an integer"),
    "k_min out of range": (_set("node", "k_min", 0), "[node].k_min: must be between 1 and 1000"),
    "listen without port": (_set("node", "listen", "127.0.0.1"), "[node].listen"),
    "port a boolean": (_set("node", "grace_s", True), "[node].grace_s: expected a number"),
    "admins not names": (_set("node", "admins", [1]), "[node].admins"),
    "admins bad name": (_set("node", "admins", ["Ops A"]), "[node].admins"),
    "dp unknown": (_set("privacy", "dp", "maybe"), "[privacy].dp: 'maybe' is not one of"),
    "gossip profile": (_set("gossip", "profile", "moon"), "[gossip].profile"),
    "metrics bad port": (_set("metrics", "listen", "127.0.0.1:99999"), "[metrics].listen"),
    "seeds not addresses": (_set("federation", "seeds", ["x"]), "[federation].seeds"),
    "cert missing": (_set("tls", "cert", "/nonexistent/node.crt"), "[tls].cert"),
    "key of another node": (_tls_file("key", lambda p, t: p.issue("node-b", "node").key),
                            "[tls].key"),
    "CA certificate as the node's": (_tls_file("cert", lambda p, t: p.ca_cert_path),
                                     "[tls].cert"),
    "another node's certificate": (_pair("node-b", "node"), "[node].name"),
    "a researcher's certificate": (_pair("node-a", "researcher"), "[node].name"),
    "key is garbage": (_tls_file("key", lambda p, t: _write(t / "k.key", b"-----BEGIN PRIVATE KEY"
                                                           b"-----\nAAAA\n-----END PRIVATE KEY-----\n")),
                       "[tls].key"),
    "key is a certificate": (_tls_file("key", lambda p, t: p.ca_cert_path), "[tls].key"),
    "cert is garbage": (_tls_file("cert", lambda p, t: _write(t / "c.crt", b"hello")), "[tls].cert"),
    "CA is a node certificate": (_tls_file("ca", lambda p, t: p.issue("node-c", "node").cert),
                                 "[tls].ca"),
    "CRL of another CA": (_tls_file("crl", lambda p, t: foreign(t / "other").crl_path), "[tls].crl"),
    "catalogs not an array": (lambda c, t, p: c.update(catalogs={"x": 1}), "catalogs"),
    "catalog root missing": (lambda c, t, p: c["catalogs"][0].update(root="/nonexistent"),
                             ".root"),
    "bounds reversed": (_field("age", "bounds", [90, 18]), ".fields.age.bounds"),
    "bounds on a category": (_field("sex", "bounds", [0, 1]), ".fields.sex.bounds"),
    "levels on a number": (_field("age", "levels", ["a"]), ".fields.age.levels"),
    "unknown field type": (_field("age", "type", "float"), ".fields.age.type"),
    "field in an undeclared table": (_field("age", "table", "nope"), ".fields.age.table"),
    "value outside the declared levels": (_table("subjects", "sex", "Q"), ".fields.sex.levels"),
    "text in a numeric field": (_table("subjects", "age", "old"), ".fields.age.type"),
    "column missing": (_field("age", "table", "outcomes"), ".fields.age.table"),
    "bounds on a mask image": (_field("vta_path", "bounds", [0, 1]), ".fields.vta_path.bounds"),
    "continuous image without bounds": (_field("vta_path", "continuous", True),
                                        ".fields.vta_path.bounds"),
    "continuous number": (_field("age", "continuous", True), ".fields.age.continuous"),
}


def _continuous(lo: float, hi: float) -> Edit:
    def edit(cfg: dict[str, Any], tmp: Path, pki: CertFactory) -> None:
        cfg["catalogs"][0]["fields"]["vta_path"].update(continuous=True, bounds=[lo, hi])
    return edit


WARNED: dict[str, tuple[Edit, str]] = {
    "metrics on every interface": (_set("metrics", "listen", "0.0.0.0:9464"),
                                   "[metrics].listen: 0.0.0.0:9464 is not a loopback address"),
    "max_voxels too small": (_field("vta_path", "max_voxels", 1), ".fields.vta_path.max_voxels: "),
    "values outside the bounds": (_field("age", "bounds", [18, 40]), ".fields.age.bounds: "),
    "image values outside the bounds": (_continuous(0, 0.5), ".fields.vta_path.bounds: "),
    "no admins": (_set("node", "admins", []), "[node].admins: no admin is named"),
}


def _apply(site: Path, edit: Edit, pki: CertFactory) -> None:
    cfg = tomllib.loads(site.read_text())
    edit(cfg, site.parent, pki)
    site.write_text(tomli_w.dumps(cfg))


def _check(site: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["check-config", str(site)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected problem" not in err, err
    return code, err.splitlines()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_config_is_one_line_naming_file_and_key(
        site: Path, pki: CertFactory, capsys: pytest.CaptureFixture[str], case: str) -> None:
    edit, names = BROKEN[case]
    _apply(site, edit, pki)
    code, lines = _check(site, capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"stimnetd: error: {site}: "), lines
    assert names in lines[0], lines


@pytest.mark.parametrize("case", sorted(WARNED))
def test_a_dubious_config_passes_with_a_warning_naming_the_key(
        site: Path, pki: CertFactory, capsys: pytest.CaptureFixture[str], case: str) -> None:
    edit, names = WARNED[case]
    _apply(site, edit, pki)
    code, lines = _check(site, capsys)
    assert code == 0, lines
    warnings = [line for line in lines if line.startswith("stimnetd: warning: ")]
    assert [w for w in warnings if names in w and f"{site}: " in w], lines


def test_the_base_config_passes_without_warnings(site: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _check(site, capsys)
    assert (code, lines) == (0, []), lines


@pytest.mark.parametrize("content", [b"[node\n", b"\xff\xfe not text", b"node = 1\n"])
def test_unparseable_files_are_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "stimnetd", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and str(path) in r.stderr, r.stderr
