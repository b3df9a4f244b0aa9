"""The federation PKI: CA, issuing, identity, chain checks, CRL, renewal, job signatures, CLI."""

from __future__ import annotations

import argparse
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stimctl.certs_cli import register
from stimnet import pki
from stimnetd.testing import CertFactory, foreign


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def ca_cert(ca_dir: Path) -> x509.Certificate:
    return pki.load_cert(ca_dir / "ca.crt")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leaf_with_sans(ca_dir: Path, sans: list[x509.GeneralName] | None) -> x509.Certificate:
    ca_cert, ca_key = pki.load_cert(ca_dir / "ca.crt"), pki.load_key(ca_dir / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


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
    assert not (tmp_path / "ca.key").exists()


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
    assert not (tmp_path / "out").exists()


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


# --------------------------------------------------------------------------- loading


def test_load_cert_and_key_report_missing_and_corrupt_files(tmp_path: Path) -> None:
    """Missing or corrupt certificate/key files raise PkiError naming the file."""
    missing = tmp_path / "nope.crt"
    with pytest.raises(pki.PkiError, match=f"{missing} does not exist"):
        pki.load_cert(missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(pki.PkiError, match=f"certificate {junk} is not a valid"):
        pki.load_cert(junk)
    with pytest.raises(pki.PkiError, match=f"private key {junk} is not a valid"):
        pki.load_key(junk)


def test_identity_requires_a_stimnet_uri_san(ca_dir: Path) -> None:
    """Certificates lacking one stimnet:// URI SAN with a known role carry no identity."""
    with pytest.raises(pki.PkiError, match="no subjectAltName"):
        pki.identity_from_cert(_leaf_with_sans(ca_dir, None))
    with pytest.raises(pki.PkiError, match="no stimnet:// URI SANs"):
        pki.identity_from_cert(_leaf_with_sans(ca_dir, [x509.DNSName("example.org")]))
    with pytest.raises(pki.PkiError, match="unknown role 'root'"):
        pki.identity_from_cert(
            _leaf_with_sans(ca_dir, [x509.UniformResourceIdentifier("stimnet://root/mallory")])
        )
    two = [
        x509.UniformResourceIdentifier("stimnet://researcher/a"),
        x509.UniformResourceIdentifier("stimnet://admin/a"),
    ]
    with pytest.raises(pki.PkiError, match="expected exactly one"):
        pki.identity_from_cert(_leaf_with_sans(ca_dir, two))


# --------------------------------------------------------------------------- verify_chain


def test_expired_cert_fails_verify_chain_with_clear_message(tmp_path: Path) -> None:
    """An expired certificate is refused with a message naming the identity and the expiry."""
    factory = CertFactory(tmp_path)
    paths = factory.issue("alice", "researcher", expired=True)
    cert, ca_cert = pki.load_cert(paths.cert), pki.load_cert(factory.ca_cert_path)
    expected = cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(
        pki.PkiError, match=f"certificate for researcher/alice .* expired at {expected}"
    ):
        pki.verify_chain(cert, ca_cert)


def test_not_yet_valid_cert_fails_verify_chain(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path
) -> None:
    """A certificate checked before its not_before is refused."""
    issued = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a")
    cert = pki.load_cert(issued.cert_path)
    with pytest.raises(pki.PkiError, match="is not valid until"):
        pki.verify_chain(cert, ca_cert, now=cert.not_valid_before_utc - timedelta(seconds=1))


def test_cert_from_another_ca_fails_verify_chain(tmp_path: Path) -> None:
    """A certificate from an unrelated CA with the same CA name is refused by signature."""
    ours, theirs = CertFactory(tmp_path), foreign(tmp_path)
    paths = theirs.issue("alice", "researcher")
    ours_cert = pki.load_cert(ours.ca_cert_path)
    assert pki.load_cert(theirs.ca_cert_path).subject == ours_cert.subject
    with pytest.raises(pki.PkiError, match="researcher/alice .* was not issued by"):
        pki.verify_chain(pki.load_cert(paths.cert), ours_cert)


def test_verify_chain_refuses_revoked_cert_when_given_a_crl(tmp_path: Path) -> None:
    """verify_chain with a RevocationList refuses a revoked certificate and accepts others."""
    factory = CertFactory(tmp_path)
    alice, bob = factory.issue("alice", "researcher"), factory.issue("bob", "researcher")
    factory.revoke("alice")
    ca_cert, crl = pki.load_cert(factory.ca_cert_path), factory.revocations()
    with pytest.raises(pki.PkiError, match="researcher/alice .* has been revoked"):
        pki.verify_chain(pki.load_cert(alice.cert), ca_cert, revocations=crl)
    assert pki.verify_chain(pki.load_cert(bob.cert), ca_cert, revocations=crl).name == "bob"


# --------------------------------------------------------------------------- revocation


def test_revoke_by_name_revokes_every_cert_of_that_name(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path
) -> None:
    """Revoking a name lists all its certificates in a CA-signed CRL, and no one else's."""
    a1 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a1")
    a2 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a2")
    bob = pki.issue(ca_dir, "bob", "researcher", tmp_path / "bob")

    revoked = pki.revoke(ca_dir, "alice")

    assert sorted(revoked) == sorted([a1.serial, a2.serial])
    crl = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert crl.is_revoked(a1.serial) and crl.is_revoked(a2.serial)
    assert not crl.is_revoked(bob.serial)
    assert {r.serial for r in pki.list_certs(ca_dir) if r.revoked} == {a1.serial, a2.serial}


@pytest.mark.parametrize("form", [str, pki.serial_hex, lambda s: f"{s:X}"])
def test_revoke_by_serial_in_decimal_or_hex(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path, form
) -> None:
    """A serial given as decimal, 0x-hex or bare hex revokes exactly that certificate."""
    a1 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a1")
    a2 = pki.issue(ca_dir, "alice", "researcher", tmp_path / "a2")

    assert pki.revoke(ca_dir, form(a1.serial)) == [a1.serial]

    crl = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert crl.revoked_serials == frozenset({a1.serial})
    assert not crl.is_revoked(a2.serial)


def test_each_crl_has_a_higher_number(
    ca_dir: Path, ca_cert: x509.Certificate, tmp_path: Path
) -> None:
    """Every rewrite of the CRL carries a larger CRL number, so peers can tell newer from older."""
    first = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert).number
    pki.issue(ca_dir, "alice", "researcher", tmp_path / "a")
    pki.revoke(ca_dir, "alice")
    second = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert).number
    pki.refresh_crl(ca_dir)
    third = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert first is not None and second is not None and third.number is not None
    assert first < second < third.number
    assert len(third.revoked_serials) == 1


def test_revoke_unknown_or_already_revoked_is_an_error(ca_dir: Path, tmp_path: Path) -> None:
    """Revoking something the CA never issued, or revoking twice, raises PkiError."""
    pki.issue(ca_dir, "alice", "researcher", tmp_path / "a")
    with pytest.raises(pki.PkiError, match="no certificate with serial or name 'carol'"):
        pki.revoke(ca_dir, "carol")
    pki.revoke(ca_dir, "alice")
    with pytest.raises(pki.PkiError, match="already revoked"):
        pki.revoke(ca_dir, "alice")


def test_crl_with_flipped_signature_byte_is_refused(
    ca_dir: Path, ca_cert: x509.Certificate
) -> None:
    """A CRL whose bytes were altered fails its signature check on load."""
    der = bytearray(
        x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-1] ^= 0x01
    tampered = ca_dir / "tampered.crl"
    tampered.write_bytes(bytes(der))
    with pytest.raises(pki.PkiError, match="bad signature"):
        pki.RevocationList.load(tampered, ca_cert)


def test_crl_signed_by_another_key_is_refused(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    """A CRL that names our CA as issuer but is signed by another key is refused."""
    now = datetime.now(UTC)
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=1))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    path = ca_dir / "forged.pem"
    path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(pki.PkiError, match=f"CRL {path} has a bad signature"):
        pki.RevocationList.load(path, ca_cert)


def test_crl_is_stale_only_after_its_next_update(ca_dir: Path, ca_cert: x509.Certificate) -> None:
    """is_stale turns true once the CRL's next_update has passed, and not before."""
    crl = pki.RevocationList.load(ca_dir / "crl.pem", ca_cert)
    assert crl.next_update is not None
    assert not crl.is_stale(crl.next_update - timedelta(seconds=1))
    assert crl.is_stale(crl.next_update + timedelta(seconds=1))


def test_corrupt_index_is_reported_with_its_path(ca_dir: Path) -> None:
    """A damaged index.json makes list_certs raise a PkiError naming the file."""
    (ca_dir / "index.json").write_text('{"version": 1, "certs": [{"serial": "x"}]}')
    with pytest.raises(pki.PkiError, match=f"CA index {ca_dir / 'index.json'} is corrupt"):
        pki.list_certs(ca_dir)


def test_empty_revocation_list_revokes_nothing() -> None:
    """RevocationList.empty() reports no serial as revoked."""
    assert not pki.RevocationList.empty().is_revoked(1)
    assert pki.RevocationList.empty().revoked_serials == frozenset()


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
    pki.revoke(ca_dir, "alice")
    with pytest.raises(pki.PkiError, match="is revoked"):
        pki.renew(ca_dir, old.cert_path)
    assert old.cert_path.exists()


def test_renew_refuses_a_cert_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    """renew only re-issues certificates this CA signed."""
    paths = foreign(tmp_path).issue("alice", "researcher")
    with pytest.raises(pki.PkiError, match="was not issued by the CA"):
        pki.renew(ca_dir, paths.cert)


# --------------------------------------------------------------------------- job signatures


def test_signed_payload_verifies_and_tampering_is_refused(tmp_path: Path) -> None:
    """A payload signature verifies with the signer's cert, and not after the payload changes."""
    factory = CertFactory(tmp_path)
    alice = factory.issue("alice", "researcher")
    cert, key = pki.load_cert(alice.cert), pki.load_key(alice.key)
    payload = b'{"catalog": "dbs_outcomes", "nonce": "1"}'

    signature = pki.sign_payload(key, payload)

    pki.verify_payload(cert, payload, signature)
    with pytest.raises(
        pki.PkiError, match="signature does not match the payload for researcher/alice"
    ):
        pki.verify_payload(cert, payload.replace(b"1", b"2"), signature)
    with pytest.raises(pki.PkiError, match="signature does not match"):
        pki.verify_payload(cert, payload, b"\x30\x00")


def test_signature_from_another_key_is_refused(tmp_path: Path) -> None:
    """A payload signed by bob does not verify against alice's certificate."""
    factory = CertFactory(tmp_path)
    alice, bob = factory.issue("alice", "researcher"), factory.issue("bob", "researcher")
    payload = b"job"
    with pytest.raises(pki.PkiError, match="researcher/alice"):
        pki.verify_payload(
            pki.load_cert(alice.cert), payload, pki.sign_payload(pki.load_key(bob.key), payload)
        )


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stimctl")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_issue_list_revoke_renew_flow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The certs sub-commands create, issue, list (table and JSON), revoke and renew, exiting 0."""
    ca, out = str(tmp_path / "ca"), tmp_path / "site-a"
    assert _run(["certs", "init-ca", ca]) == 0
    assert (
        _run(
            [
                "certs",
                "issue",
                "--ca",
                ca,
                "--name",
                "site-a",
                "--role",
                "node",
                "--host",
                "localhost",
                "--host",
                "127.0.0.1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        _run(
            [
                "certs",
                "issue",
                "--ca",
                ca,
                "--name",
                "alice",
                "--role",
                "researcher",
                "--out",
                str(tmp_path / "alice"),
                "--days",
                "30",
            ]
        )
        == 0
    )
    capsys.readouterr()

    assert _run(["certs", "list", "--ca", ca]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "ROLE", "SERIAL"]
    assert any(
        line.split()[:2] == ["site-a", "node"] and "localhost,127.0.0.1" in line for line in table
    )

    assert _run(["certs", "revoke", "--ca", ca, "alice"]) == 0
    assert _run(["certs", "renew", "--ca", ca, str(out / "site-a.crt")]) == 0
    capsys.readouterr()
    assert _run(["certs", "list", "--ca", ca, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    status = sorted((r["name"], r["status"]) for r in rows)
    assert status == [("alice", "revoked"), ("site-a", "valid"), ("site-a", "valid")]
    assert all(int(r["serial"]) == int(r["serial_hex"], 16) for r in rows)


def test_cli_pki_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PkiError in any certs command prints one 'stimctl: error:' line to stderr and returns 2."""
    ca = str(tmp_path / "ca")
    assert _run(["certs", "init-ca", ca]) == 0
    capsys.readouterr()
    cases = [
        ["certs", "init-ca", ca],
        [
            "certs",
            "issue",
            "--ca",
            ca,
            "--name",
            "Bad Name",
            "--role",
            "researcher",
            "--out",
            str(tmp_path / "x"),
        ],
        ["certs", "revoke", "--ca", ca, "nobody"],
        ["certs", "list", "--ca", str(tmp_path / "no-ca")],
        ["certs", "renew", "--ca", ca, str(tmp_path / "missing.crt")],
    ]
    for argv in cases:
        assert _run(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("stimctl: error: "), (argv, captured.err)


def test_cli_rejects_non_positive_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--days 0 is an argparse usage error (exit 2) before any file is written."""
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["certs", "init-ca", str(tmp_path / "ca"), "--days", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()


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
