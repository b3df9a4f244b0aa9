"""stimctl follows Unix CLI conventions: --version, a quiet end when its reader stops
(`| head`), --json honoured wherever it is given, JSON numbers as numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stimctl.output import message_dict
from stimnet.v1 import admin_pb2, node_pb2
from stimnetd.testing import CertFactory

STIMCTL = [sys.executable, "-m", "stimctl.cli"]


def test_version() -> None:
    r = subprocess.run([*STIMCTL, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("stimctl ") and r.stdout.split()[1][0].isdigit()


def test_a_reader_that_stops_early_gets_no_traceback(pki: CertFactory) -> None:
    # More than a pipe's buffer (64 KiB), so stimctl is still writing when the reader stops.
    for i in range(260):
        pki.issue(f"user-{i}", "researcher")
    proc = subprocess.Popen([*STIMCTL, "--json", "certs", "list", "--ca", str(pki.ca_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()  # as `| head -c 10` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_global_json_flag_reaches_certs_list(pki: CertFactory) -> None:
    pki.issue("alice", "researcher")
    r = subprocess.run([*STIMCTL, "--json", "certs", "list", "--ca", str(pki.ca_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "alice" in {c["name"] for c in json.loads(r.stdout)}


def test_json_numbers_are_numbers() -> None:
    verified = message_dict(admin_pb2.VerifyAuditResponse(ok=True, entries=12, first_bad_seq=0))
    assert verified["entries"] == 12
    catalogs = message_dict(node_pb2.ListCatalogsResponse(catalogs=[
        node_pb2.CatalogSummary(name="a", subjects="180"),
        node_pb2.CatalogSummary(name="b", subjects="< 5")]))
    assert [c["subjects"] for c in catalogs["catalogs"]] == [180, "< 5"]
    peers = message_dict(node_pb2.ListPeersResponse(peers=[node_pb2.Peer(name="x",
                                                                         incarnation=3)]))
    assert peers["peers"][0]["incarnation"] == 3


def test_exit_statuses_are_documented() -> None:
    from stimctl.exits import EXIT_CODES

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for _, code in EXIT_CODES:
        assert f"| {code} |" in readme, code
