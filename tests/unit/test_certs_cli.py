"""`stimctl certs`: the PKI's command line (stimctl.certs_cli)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from stimctl.certs_cli import register


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
    assert _run(["certs", "issue", "--ca", ca, "--name", "site-a", "--role", "node",
                 "--host", "localhost", "--host", "127.0.0.1", "--out", str(out)]) == 0
    assert _run(["certs", "issue", "--ca", ca, "--name", "alice", "--role", "researcher",
                 "--out", str(tmp_path / "alice"), "--days", "30"]) == 0
    capsys.readouterr()

    assert _run(["certs", "list", "--ca", ca]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "ROLE", "SERIAL"]
    site_rows = [line.split() for line in table if line.split()[:2] == ["site-a", "node"]]
    assert [(r[0], r[1], r[-2], r[-1]) for r in site_rows] == [("site-a", "node", "valid", "localhost,127.0.0.1")]

    assert _run(["certs", "revoke", "--ca", ca, "alice"]) == 0
    assert _run(["certs", "renew", "--ca", ca, str(out / "site-a.crt")]) == 0
    capsys.readouterr()
    assert _run(["certs", "list", "--ca", ca, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    status = sorted((r["name"], r["status"]) for r in rows)
    assert status == [("alice", "revoked"), ("site-a", "valid"), ("site-a", "valid")]
    assert [int(r["serial"]) for r in rows] == [int(r["serial_hex"], 16) for r in rows]


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
        assert [line[:16] for line in captured.err.splitlines()] == ["stimctl: error: "], (argv, captured.err)


def test_cli_rejects_non_positive_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--days 0 is an argparse usage error (exit 2) before any file is written."""
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["certs", "init-ca", str(tmp_path / "ca"), "--days", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


