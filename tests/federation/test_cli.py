"""stimctl as a researcher uses it: tables by default, JSON/CSV for machines, one-line errors."""

from __future__ import annotations

import asyncio
import json
import re
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
        code, out, err = await _run(capsys, "--config", cfg, "query", sql)
        assert code == 0 and "count(*)" in out and "contributions" in out
        # Live progress off a terminal: each site's report, then the job's final state.
        assert re.sub(r"\b[0-9a-f]{24}\b", "ID", err).splitlines() == [
            "  node-a: done", "job ID: succeeded 1 site(s) contributed"]
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
        # Exit statuses by class of error (stimctl/exits.py, README).
        for argv, status, needle in (
            (("query", "SELECT * FROM dbs_outcomes"), 2, "refused before sending"),
            (("describe", "nope"), 6, "no catalog named 'nope'"),
            (("query", "--federated", "SELECT count(*) FROM nope"), 5,
             "no site this node knows of holds catalog 'nope'"),
            (("status",), 3, "may not call"),
        ):
            code, out, err = await _run(capsys, "--config", cfg, *argv)
            assert code == status and len(err.strip().splitlines()) == 1 and needle in err, \
                (code, err)
        # A certificate the node cannot accept: the node's reason, in one line.
        expired = pki.issue("alice", "researcher", expired=True)
        (tmp_path / "old").mkdir()
        old = str(_client_file(tmp_path / "old", expired, d.port))
        code, _, err = await _run(capsys, "--config", old, "info")
        assert code == 3 and len(err.strip().splitlines()) == 1, err
        assert "researcher/alice" in err and "expired at" in err, err
    dead = str(_client_file(tmp_path, alice, free_port()))
    code, _, err = await _run(capsys, "--config", dead, "info")
    assert code == 7 and err.startswith("stimctl: error: cannot reach node") and "\n" not in err.strip()
    code, _, err = await _run(capsys, "--config", str(tmp_path / "missing.toml"), "info")
    assert code == 2 and "does not exist" in err


async def test_output_options_are_checked_before_anything_is_spent(
        start_node, pki: CertFactory, small_catalog: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--out and --json/--csv that cannot work, and a job no node accepts (epsilon NaN,
    min_sites 0), are refused in one line before a job is submitted, so no budget is spent
    on an answer that could not be written; --out DIR gets result.json."""
    alice = pki.issue("alice", "researcher")
    sql = "SELECT count(*) FROM dbs_outcomes"
    async with start_node("node-a", catalogs=[small_catalog]) as d:
        cfg = str(_client_file(tmp_path, alice, d.port))
        (tmp_path / "a-file").write_text("")
        for argv, code_, needle in (
            (("--epsilon", "nan"), 2, "job refused before sending: epsilon must be a finite"),
            (("--min-sites", "0"), 2, "job refused before sending: min_sites must be"),
            (("--out", str(tmp_path / "r.txt")), 2, "name a .json or .csv file, or a directory"),
            (("--out", str(tmp_path / "no" / "r.json")), 2, "directory " + str(tmp_path / "no")
             + " does not exist"),
            (("--out", str(tmp_path / "a-file" / "r.json")), 2, "a-file is not a directory"),
            (("--json", "--csv"), 2, "--json and --csv exclude each other"),
        ):
            code, out, err = await _run(capsys, "--config", cfg, "query", *argv, sql)
            assert (code, out) == (code_, "") and needle in err and len(err.splitlines()) == 1, \
                (argv, code, err)
        code, out, _ = await _run(capsys, "--config", cfg, "jobs", "--json")
        assert code == 0 and json.loads(out) == []  # nothing was submitted
        code, _, err = await _run(capsys, "--config", cfg, "query", "--out",
                                  str(tmp_path / "answers" / "q1"), sql)
        assert code == 0, err
        doc = json.loads((tmp_path / "answers" / "q1" / "result.json").read_text())
        assert doc["result"]["rows"] == [[20]]
