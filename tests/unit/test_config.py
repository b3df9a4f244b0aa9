"""Bad configs and catalogs are refused with one clear line naming the problem."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from stimnetd.catalog import CatalogError, load_catalogs
from stimnetd.config import ConfigError, load_config
from stimnetd.testing import CertFactory, write_node_config


@pytest.fixture
def good(tmp_path: Path, pki: CertFactory, small_catalog_root: Path, small_catalog: dict) -> dict:
    root = tmp_path / "catalog"
    shutil.copytree(small_catalog_root, root)
    certs = pki.issue("node-a", "node")
    path = write_node_config(tmp_path / "site", certs, "node-a", port=7001,
                             catalogs=[{**small_catalog, "root": str(root)}])
    import tomllib

    return {"path": path, "raw": tomllib.loads(path.read_text()), "root": root}


def _write(good: dict, raw: dict) -> Path:
    good["path"].write_text(tomli_w.dumps(raw))
    return good["path"]


def _load_all(path: Path) -> None:
    cfg = load_config(path)
    load_catalogs(cfg.catalogs)


def test_good_config_loads(good: dict) -> None:
    """The fixture config loads with its catalog and defaults."""
    cfg = load_config(good["path"])
    assert cfg.node.name == "node-a" and cfg.node.port == 7001 and cfg.node.k_min == 5
    assert cfg.node.job_retention_days == 90.0
    assert load_catalogs(cfg.catalogs).get("dbs_outcomes").n_subjects == 20


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["node"].update(listen="127.0.0.1:99999"), r"\[node\]\.listen: port 99999 is out of range"),
    (lambda r: r["node"].update(listen="nonsense"), r"\[node\]\.listen: 'nonsense' is not HOST:PORT"),
    (lambda r: r["node"].update(colour="blue"), r"\[node\]: unknown key 'colour'"),
    (lambda r: r["tls"].update(max_handshakes_per_host=0), r"\[tls\]\.max_handshakes_per_host: must be between 1 and 100000"),
    (lambda r: r["tls"].update(refusals_audited_per_minute=0), r"\[tls\]\.refusals_audited_per_minute: must be between 1 and 100000"),
    (lambda r: r["tls"].update(handshake_timeout_s=0), r"\[tls\]\.handshake_timeout_s: must be between 0.1 and 300"),
    (lambda r: r["tls"].update(handshake_wait_s=-1), r"\[tls\]\.handshake_wait_s: must be between 0 and 300"),
    (lambda r: r["tls"].update(terminate="nginx"), r"\[tls\]\.terminate: 'nginx' is not one of stimnet, grpc"),
    (lambda r: r.update(extra={"a": 1}), r"top level: unknown key 'extra'"),
    (lambda r: r["node"].update(k_min=0), r"\[node\]\.k_min: must be between 1 and 1000"),
    (lambda r: r.setdefault("scripts", {}).update(max_pending_per_researcher=0),
     r"\[scripts\]\.max_pending_per_researcher: must be between 1 and 100000"),
    (lambda r: r.setdefault("scripts", {}).update(release_slot_s=-1),
     r"\[scripts\]\.release_slot_s: must be between 0 \(no hold\) and 86400 seconds"),
    (lambda r: r["node"].update(max_queries_per_researcher=0),
     r"\[node\]\.max_queries_per_researcher: must be between 1 and 100000, got 0"),
    (lambda r: r.setdefault("federation", {}).update(max_subjobs_per_entry="many"),
     r"\[federation\]\.max_subjobs_per_entry"),
    (lambda r: r["node"].update(job_retention_days=-1),
     r"\[node\]\.job_retention_days: must be 0 \(keep finished jobs forever\) or more, got -1"),
    (lambda r: r["node"].update(job_retention_days="30d"),
     r"\[node\]\.job_retention_days: expected a number, got str"),
    (lambda r: r["node"].update(name="Bad Name"), r"\[node\]\.name"),
    (lambda r: r["tls"].update(cert="/nonexistent/node.crt"), r"\[tls\]\.cert: file /nonexistent/node.crt does not exist"),
    (lambda r: r["privacy"].update(dp="maybe") if "privacy" in r else r.update(privacy={"dp": "maybe"}),
     r"\[privacy\]\.dp: 'maybe' is not one of off, optional, required"),
    (lambda r: r.pop("tls"), r"missing required table \[tls\]"),
    (lambda r: r["node"].update(listen=7001), r"\[node\]\.listen: expected a string, got int"),
])
def test_bad_config_is_named(good: dict, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    """Each malformed setting raises a ConfigError naming the key and the rule."""
    raw = good["raw"]
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        load_config(_write(good, raw))


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is named in the error."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML says so."""
    p = tmp_path / "bad.toml"
    p.write_text("[node\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_unusable_cert(good: dict) -> None:
    """A certificate file that is not a certificate is named in the error."""
    from stimnetd.tls import ServerTls, TlsError

    Path(good["raw"]["tls"]["cert"]).write_text("not a certificate")
    with pytest.raises(TlsError, match="node-a.crt"):
        ServerTls(load_config(good["path"]).tls)


def test_catalog_path_escaping_root(good: dict) -> None:
    """A table path leaving the catalog root is refused."""
    raw = good["raw"]
    raw["catalogs"][0]["tables"]["subjects"] = "../../etc/passwd"
    with pytest.raises(ConfigError, match="escapes the catalog root"):
        load_config(_write(good, raw))


def test_catalog_missing_table(good: dict) -> None:
    """A declared table file that is missing is named."""
    (good["root"] / "outcomes.csv").unlink()
    with pytest.raises(ConfigError, match="outcomes.csv does not exist"):
        load_config(good["path"])


def test_catalog_field_not_in_table(good: dict) -> None:
    """A declared field absent from its CSV is named with the table."""
    raw = good["raw"]
    raw["catalogs"][0]["fields"]["tremor_score"] = {"table": "outcomes", "type": "numeric"}
    with pytest.raises(CatalogError, match=r"\.fields\.tremor_score\.table: declared in table outcomes"):
        _load_all(_write(good, raw))


def test_truncated_nifti_is_reported_by_name(good: dict) -> None:
    """A truncated .nii.gz in the catalog is reported with its path."""
    victim = sorted((good["root"] / "images" / "vta").iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CatalogError, match=victim.name):
        _load_all(good["path"])


def test_uncompressed_truncated_nifti_is_reported(good: dict) -> None:
    """A truncated plain .nii is reported with its path too."""
    victim = sorted((good["root"] / "images" / "vta").iterdir())[0]
    plain = victim.with_suffix("")  # x.nii
    plain.write_bytes(gzip.decompress(victim.read_bytes())[:400])
    import pandas as pd

    stim = good["root"] / "stimulation.csv"
    df = pd.read_csv(stim, dtype=str)
    df.loc[0, "vta_path"] = str(plain.relative_to(good["root"]))
    df.to_csv(stim, index=False)
    with pytest.raises(CatalogError, match=plain.name):
        _load_all(good["path"])


def test_an_image_in_another_format_is_refused(good: dict) -> None:
    """nibabel opens MGH (and Analyze, …) too; the catalog takes NIfTI only, and says what
    the file is instead."""
    import nibabel as nib
    import numpy as np
    import pandas as pd

    victim = sorted((good["root"] / "images" / "vta").iterdir())[0]
    mgh = victim.parent / "other.mgz"
    nib.save(nib.MGHImage(np.asarray(nib.load(victim).dataobj, dtype=np.float32), np.eye(4)), mgh)
    stim = good["root"] / "stimulation.csv"
    df = pd.read_csv(stim, dtype=str)
    df.loc[0, "vta_path"] = str(mgh.relative_to(good["root"]))
    df.to_csv(stim, index=False)
    with pytest.raises(CatalogError, match=r"other\.mgz is not a readable NIfTI image: it is a "
                                           "MGHImage, not NIfTI-1 or NIfTI-2"):
        _load_all(good["path"])


def test_image_path_escaping_root(good: dict) -> None:
    """An image path in a table that escapes the catalog root is refused."""
    import pandas as pd

    stim = good["root"] / "stimulation.csv"
    df = pd.read_csv(stim, dtype=str)
    df.loc[0, "vta_path"] = "../../../../etc/hostname"
    df.to_csv(stim, index=False)
    with pytest.raises(CatalogError, match="escapes the catalog root"):
        _load_all(good["path"])


def test_non_numeric_values_in_numeric_field(good: dict) -> None:
    """Text in a numeric column is refused without echoing the value."""
    import pandas as pd

    p = good["root"] / "subjects.csv"
    df = pd.read_csv(p, dtype=str)
    df.loc[2, "age"] = "secret-value"
    df.to_csv(p, index=False)
    with pytest.raises(CatalogError, match=r"\.fields\.age\.type: declared numeric") as err:
        _load_all(good["path"])
    assert "secret-value" not in str(err.value)


@pytest.mark.parametrize("breakage", ["missing-file", "unknown-key", "bad-port", "bad-cert",
                                      "cert-for-another-node"])
def test_stimnetd_exits_nonzero_with_one_line(good: dict, breakage: str) -> None:
    """`stimnetd --config` on a broken config exits 2 with a single 'stimnetd: error:' line."""
    path = good["path"]
    raw = good["raw"]
    if breakage == "missing-file":
        path = path.with_name("missing.toml")
    elif breakage == "unknown-key":
        raw["node"]["typo"] = 1
        _write(good, raw)
    elif breakage == "bad-port":
        raw["node"]["listen"] = "127.0.0.1:70000"
        _write(good, raw)
    elif breakage == "cert-for-another-node":
        raw["node"]["name"] = "node-b"  # the certificate is node-a's
        _write(good, raw)
    else:
        Path(raw["tls"]["cert"]).write_text("garbage")
    r = subprocess.run([sys.executable, "-m", "stimnetd", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert [line[:17] for line in lines] == ["stimnetd: error: "], r.stderr
    if breakage == "cert-for-another-node":
        assert "'node-b'" in r.stderr and "'node-a'" in r.stderr


def test_check_config_accepts_good_config(good: dict) -> None:
    """`stimnetd check-config` validates a good config and exits 0."""
    r = subprocess.run([sys.executable, "-m", "stimnetd", "check-config", str(good["path"])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_check_config_refuses_a_corrupt_store(good: dict) -> None:
    """check-config also checks the node's store and names it when it is corrupt."""
    import tomllib

    state = Path(tomllib.loads(good["path"].read_text())["node"]["state_dir"])
    state.mkdir(parents=True, exist_ok=True)
    (state / "stimnetd.sqlite3").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    r = subprocess.run([sys.executable, "-m", "stimnetd", "check-config", str(good["path"])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "stimnetd.sqlite3" in r.stderr and "backup" in r.stderr


@pytest.mark.parametrize("mode", ["off", "optional", "required"])
def test_a_site_without_required_dp_states_its_risk_once(good: dict, mode: str) -> None:
    """optional/off: one line naming the mode, what it does not guarantee and the way to a
    formal guarantee; required: none."""
    from stimnetd.config.advice import privacy_risks

    raw = {**good["raw"], "privacy": {**good["raw"].get("privacy", {}), "dp": mode}}
    risks = privacy_risks(load_config(_write(good, raw)))
    if mode == "required":
        assert risks == []
    else:
        (line,) = risks
        assert f"[privacy].dp = '{mode}'" in line and "best effort" in line
        assert 'dp = "required"' in line and "docs/privacy.md" in line
