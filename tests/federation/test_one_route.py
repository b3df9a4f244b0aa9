"""`stimctl query` and `Client.query` take one route to an answer: the same RPCs, in the
same order, as the node's audit log records them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import tomli_w

from stimctl import Client
from stimctl.cli import main as stimctl
from stimnetd.testing import CertFactory, CertPaths
from tests.helpers import client_config

SQL = "SELECT sex, count(*) FROM dbs_outcomes GROUP BY sex"


def _config_file(path: Path, certs: CertPaths, port: int) -> str:
    path.write_text(tomli_w.dumps({"address": f"127.0.0.1:{port}", "ca": str(certs.ca),
                                   "cert": str(certs.cert), "key": str(certs.key),
                                   "timeout_s": 20}))
    return str(path)


def _notebook_query(certs: CertPaths, port: int) -> list[list[object]]:
    with Client(client_config(certs, f"127.0.0.1:{port}", 20)) as c:
        return c.query(SQL).rows


async def test_cli_and_client_query_make_the_same_calls(
        start_node, pki: CertFactory, small_catalog: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One query by `stimctl query` (alice) and one by `Client.query` (bob) leave the same
    sequence of audited calls and actions at the node, and the same answer."""
    # Prepare
    alice, bob = pki.issue("alice", "researcher"), pki.issue("bob", "researcher")
    ops = pki.issue("ops", "admin")
    async with start_node("node-a", catalogs=[small_catalog]) as d:
        # Execute
        code = await asyncio.to_thread(stimctl, ["--config", _config_file(
            tmp_path / "alice.toml", alice, d.port), "query", "--json", SQL])
        cli_rows = json.loads(capsys.readouterr().out)["result"]["rows"]
        notebook_rows = await asyncio.to_thread(_notebook_query, bob, d.port)
        export = await asyncio.to_thread(stimctl, ["--config", _config_file(
            tmp_path / "ops.toml", ops, d.port), "audit", "export"])
        entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Assert
    assert (code, export) == (0, 0)
    assert cli_rows == notebook_rows == [["F", 9], ["M", 11]]
    calls = {who: [e["action"] for e in entries if e.get("actor") == who]
             for who in ("alice", "bob")}
    assert calls["alice"] == calls["bob"] == [
        "/stimnet.v1.NodeService/GetInfo",
        "/stimnet.v1.JobService/Session",
        "/stimnet.v1.JobService/RunJob",
        "submit",
        "release",
    ]
