"""stimctl as a researcher uses it: tables by default, JSON/CSV for machines, one-line errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import tomli_w

from stimctl.cli import main as stimctl
from stimnetd.testing import CertFactory, free_port


def _client_file(tmp_path: Path, certs, port: int) -> Path:  # type: ignore[no-untyped-def]
    p = tmp_path / "client.toml"
    p.write_text(tomli_w.dumps({"address": f"127.0.0.1:{port}", "ca": str(certs.ca),
                                "cert": str(certs.cert), "key": str(certs.key), "timeout_s": 20}))
    return p


async def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(stimctl, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_researcher_session(start_node, pki: CertFactory, small_catalog: dict,
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """info, catalogs, describe, query (table, --json, --csv), jobs, job, results all work."""
    alice = pki.issue("alice", "researcher")
    async with start_node("node-a", catalogs=[small_catalog]) as d:
        cfg = str(_client_file(tmp_path, alice, d.port))
        code, out, _ = await _run(capsys, "--config", cfg, "info", "--json")
        assert code == 0 and json.loads(out)["caller"] == "alice"
        code, out, _ = await _run(capsys, "--config", cfg, "catalogs")
        assert code == 0 and "dbs_outcomes" in out and "20" in out
        code, out, _ = await _run(capsys, "--config", cfg, "describe", "dbs_outcomes")
        assert code == 0 and "vta_path" in out and "91×109×91" in out
        sql = "SELECT sex, count(*), avg(age) FROM dbs_outcomes GROUP BY sex"
        code, out, _ = await _run(capsys, "--config", cfg, "query", sql)
        assert code == 0 and "count(*)" in out and "contributions" in out
        code, out, err = await _run(capsys, "--config", cfg, "query", "--csv",
                                    "SELECT count(*) FROM dbs_outcomes")
        assert code == 0 and out.splitlines() == ["count(*)", "20"], (code, out, err)
        code, out, _ = await _run(capsys, "--config", cfg, "query", "--json",
                                  "SELECT count(*) FROM dbs_outcomes WHERE age > 0")
        doc = json.loads(out)
        assert code == 0 and doc["result"]["rows"] == [[20]]
        code, out, _ = await _run(capsys, "--config", cfg, "jobs", "--json")
        jobs = json.loads(out)
        assert code == 0 and len(jobs) == 3 and {j["state"] for j in jobs} == {"succeeded"}
        code, out, _ = await _run(capsys, "--config", cfg, "job", doc["job"])
        assert code == 0 and "succeeded" in out
        code, out, _ = await _run(capsys, "--config", cfg, "results", doc["job"], "--json")
        assert code == 0 and json.loads(out)["result"]["rows"] == [[20]]


async def test_errors_are_one_line(start_node, pki: CertFactory, small_catalog: dict,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused SQL, unknown catalogs, wrong roles and dead nodes print one line, exit non-zero."""
    alice = pki.issue("alice", "researcher")
    async with start_node("node-a", catalogs=[small_catalog]) as d:
        cfg = str(_client_file(tmp_path, alice, d.port))
        for argv, needle in (
            (("query", "SELECT * FROM dbs_outcomes"), "refused before sending"),
            (("describe", "nope"), "no catalog named 'nope'"),
            (("query", "--federated", "SELECT count(*) FROM nope"),
             "no site this node knows of holds catalog 'nope'"),
            (("status",), "may not call"),
        ):
            code, out, err = await _run(capsys, "--config", cfg, *argv)
            assert code == 1 and len(err.strip().splitlines()) == 1 and needle in err, err
        # A certificate the node cannot accept: the node's reason, in one line.
        expired = pki.issue("alice", "researcher", expired=True)
        (tmp_path / "old").mkdir()
        old = str(_client_file(tmp_path / "old", expired, d.port))
        code, _, err = await _run(capsys, "--config", old, "info")
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "researcher/alice" in err and "expired at" in err, err
    dead = str(_client_file(tmp_path, alice, free_port()))
    code, _, err = await _run(capsys, "--config", dead, "info")
    assert code == 1 and err.startswith("stimctl: error: cannot reach node") and "\n" not in err.strip()
    code, _, err = await _run(capsys, "--config", str(tmp_path / "missing.toml"), "info")
    assert code == 1 and "does not exist" in err
