"""The PKI's certificate authority: creating the CA, issuing and renewing leaf
certificates (stimnet.pki.authority, stimnet.pki.issuing), and the test CertFactory."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stimnet import pki
from stimnetd.testing import CertFactory, foreign


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- CA


def test_init_ca_writes_ca_files_with_private_modes(ca_dir: Path) -> None:
    """init_ca writes ca.crt, ca.key, crl.pem and index.json, with the key 0600 in a 0700 dir."""
    assert {"ca.crt", "ca.key", "crl.pem", "index.json"} <= {p.name for p in ca_dir.iterdir()}
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir) == 0o700
    assert json.loads((ca_dir / "index.json").read_text())["certs"] == []


def test_init_ca_refuses_to_overwrite_an_existing_ca(ca_dir: Path) -> None:
    """A second init_ca on the same directory raises and leaves the original CA key untouched."""
    key_before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.init_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == key_before


def test_init_ca_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    """init_ca will not take over (and chmod) a directory that already holds other files."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(pki.PkiError, match="not empty"):
        pki.init_ca(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_initial_crl_is_empty_and_signed_by_the_ca(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    """The CRL written by init_ca verifies against the CA and revokes nothing."""
    crl = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert crl.revoked_serials == frozenset()
    assert crl.next_update is not None and crl.next_update > datetime.now(UTC)


# --------------------------------------------------------------------------- issuing


@pytest.mark.parametrize("role", pki.ROLES)
def test_issue_round_trips_identity_for_each_role(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path, role: str
) -> None:
    """A certificate issued for (name, role) yields that identity and serial, verified by the CA."""
    hosts = ("127.0.0.1", "site-a.example.org") if role == "node" else ()
    issued = pki.issue(ca_dir, "site-a", role, tmp_path / "out", hosts=hosts)
    cert = pki.load_cert(issued.cert_path)

    identity = pki.verify_chain(cert, ca_cert)

    assert (identity.name, identity.role, identity.serial) == ("site-a", role, issued.serial)
    assert identity.not_after == cert.not_valid_after_utc
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-a"
    assert pki.identity_from_cert(issued.cert_path.read_bytes()) == identity
    assert pki.identity_from_cert(cert.public_bytes(serialization.Encoding.DER)) == identity


def test_issued_key_is_0600_and_ca_cert_is_copied(ca_dir: Path, tmp_path: Path) -> None:
    """issue writes the private key with mode 0600 and puts the CA certificate beside it."""
    issued = pki.issue(ca_dir, "alice", "researcher", tmp_path / "alice")
    assert _mode(issued.key_path) == 0o600
    assert (tmp_path / "alice" / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()
    assert pki.load_key(issued.key_path).curve.name == "secp256r1"


def test_node_cert_serves_and_calls_with_host_sans(ca_dir: Path, tmp_path: Path) -> None:
    """A node certificate has serverAuth and clientAuth and carries its hosts as IP/DNS SANs."""
    issued = pki.issue(ca_dir, "n1", "node", tmp_path / "n1", hosts=("10.1.2.3", "n1.example"))
    cert = pki.load_cert(issued.cert_path)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value

    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert san.get_values_for_type(x509.DNSName) == ["n1.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["stimnet://node/n1"]
    assert basic.ca is False


def test_researcher_cert_is_client_only(ca_dir: Path, tmp_path: Path) -> None:
    """A researcher certificate can authenticate a client but cannot serve TLS."""
    issued = pki.issue(ca_dir, "alice", "researcher", tmp_path / "alice")
    eku = pki.load_cert(issued.cert_path).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(
    "name", ["Alice", "-alice", ".alice", "", "a/b", "../x", "alice smith", "a" * 64, "ålice"]
)
def test_issue_refuses_bad_names(ca_dir: Path, tmp_path: Path, name: str) -> None:
    """Names outside [a-z0-9][a-z0-9._-]{0,62} are refused before any file is written."""
    with pytest.raises(pki.PkiError, match="invalid identity name"):
        pki.issue(ca_dir, name, "researcher", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca"]


def test_issue_accepts_the_longest_valid_name(ca_dir: Path, tmp_path: Path) -> None:
    """A 63-character name is at the limit and is accepted."""
    name = "a" + "b" * 62
    issued = pki.issue(ca_dir, name, "admin", tmp_path / "out")
    assert pki.identity_from_cert(pki.load_cert(issued.cert_path)).name == name


def test_issue_refuses_unknown_role(ca_dir: Path, tmp_path: Path) -> None:
    """A role outside ROLES is refused with a message listing the valid roles."""
    with pytest.raises(pki.PkiError, match="unknown role 'root'.*node, researcher, admin"):
        pki.issue(ca_dir, "alice", "root", tmp_path / "out")


def test_issue_refuses_hosts_on_user_certs_and_nodes_without_hosts(
    ca_dir: Path, tmp_path: Path
) -> None:
    """Hosts belong to node certificates only, and a node certificate needs at least one."""
    with pytest.raises(pki.PkiError, match="only node certificates carry hosts"):
        pki.issue(ca_dir, "alice", "researcher", tmp_path / "a", hosts=("localhost",))
    with pytest.raises(pki.PkiError, match="needs at least one host"):
        pki.issue(ca_dir, "n1", "node", tmp_path / "n")
    with pytest.raises(pki.PkiError, match="invalid host"):
        pki.issue(ca_dir, "n1", "node", tmp_path / "n", hosts=("*.example.org",))


def test_issue_refuses_to_overwrite_existing_files(ca_dir: Path, tmp_path: Path) -> None:
    """Issuing the same name into the same directory twice raises and keeps the first key."""
    first = pki.issue(ca_dir, "alice", "researcher", tmp_path / "alice")
    key_before = first.key_path.read_bytes()
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.issue(ca_dir, "alice", "researcher", tmp_path / "alice")
    assert first.key_path.read_bytes() == key_before


def test_issue_refuses_a_different_ca_cert_in_the_output_dir(ca_dir: Path, tmp_path: Path) -> None:
    """An out dir whose ca.crt belongs to another CA is an error, not silently replaced."""
    other = foreign(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ca.crt").write_bytes(other.ca_cert_path.read_bytes())
    with pytest.raises(pki.PkiError, match="is not the certificate of the CA"):
        pki.issue(ca_dir, "alice", "researcher", out)
    assert (out / "ca.crt").read_bytes() == other.ca_cert_path.read_bytes()


def test_issue_refuses_validity_beyond_the_ca(ca_dir: Path, tmp_path: Path) -> None:
    """A certificate may not outlive the CA that signed it."""
    with pytest.raises(pki.PkiError, match="after the CA certificate expires"):
        pki.issue(ca_dir, "alice", "researcher", tmp_path / "a", days=10_000)


# --------------------------------------------------------------------------- renewal


def test_renew_keeps_identity_and_hosts_and_changes_serial(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path
) -> None:
    """renew issues a new key and serial for the same name/role/hosts and keeps the old pair."""
    out = tmp_path / "n1"
    old = pki.issue(ca_dir, "n1", "node", out, hosts=("n1.example", "10.0.0.7"))
    old_cert_bytes, old_key_bytes = old.cert_path.read_bytes(), old.key_path.read_bytes()

    new = pki.renew(ca_dir, old.cert_path)

    identity = pki.verify_chain(pki.load_cert(new.cert_path), ca_cert)
    assert (identity.name, identity.role) == ("n1", "node")
    assert new.serial != old.serial and new.cert_path == old.cert_path
    assert new.key_path.read_bytes() != old_key_bytes
    suffix = f"bak-{pki.serial_hex(old.serial)}"
    assert (out / f"n1.crt.{suffix}").read_bytes() == old_cert_bytes
    assert (out / f"n1.key.{suffix}").read_bytes() == old_key_bytes
    assert _mode(new.key_path) == 0o600
    records = {r.serial: r for r in pki.list_certs(ca_dir)}
    assert records[new.serial].hosts == records[old.serial].hosts == ("n1.example", "10.0.0.7")


def test_renew_refuses_a_revoked_cert(ca_dir: Path, tmp_path: Path) -> None:
    """A revoked certificate cannot be renewed back to life."""
    old = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a")
    before = old.cert_path.read_bytes()
    pki.revoke(ca_dir, "alice")
    with pytest.raises(pki.PkiError, match="is revoked"):
        pki.renew(ca_dir, old.cert_path)
    assert old.cert_path.read_bytes() == before
    assert sorted(p.name for p in old.cert_path.parent.iterdir()) == ["alice.crt", "alice.key", "ca.crt"]


def test_renew_refuses_a_cert_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    """renew only re-issues certificates this CA signed."""
    paths = foreign(tmp_path).issue("alice", "researcher")
    with pytest.raises(pki.PkiError, match="was not issued by the CA"):
        pki.renew(ca_dir, paths.cert)


# --------------------------------------------------------------------------- testing helpers


def test_cert_factory_lays_out_per_identity_dirs(tmp_path: Path) -> None:
    """CertFactory issues into base/<role>-<name>/ with the CA cert alongside, and keeps
    expired certs in their own directory so they can coexist with valid ones."""
    factory = CertFactory(tmp_path)
    valid = factory.issue("site-a", "node")
    expired = factory.issue("site-a", "node", expired=True)
    assert valid.cert == tmp_path / "node-site-a" / "site-a.crt"
    assert valid.ca.read_bytes() == factory.ca_cert_path.read_bytes()
    assert expired.cert.parent == tmp_path / "node-site-a-expired"
    assert factory.crl_path == tmp_path / "ca" / "crl.pem"
