"""read_outputs and log handling: what a container wrote is read only when it is plainly a
result, and a refusal names the rule, never the script's file names (no Docker)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stimnetd.sandbox.outputs import ResultRefused, log_lines, marker, read_outputs

CAP = 1 << 20


def _voxel_doc(ref: str) -> dict[str, object]:
    return {"version": 1, "aggregates": [{"kind": "voxel_map", "name": "v", "n": 1,
                                          "stats": {"count": {"npy": ref}}}]}


def _write(out: Path, doc: object) -> None:
    (out / "result.json").write_text(json.dumps(doc))


class TestReadOutputs:
    def test_a_result_and_its_array_files_are_read(self, tmp_path: Path) -> None:
        """A JSON result and each .npy file it refers to come back, arrays by file name."""
        np.save(tmp_path / "a.npy", np.arange(3.0))
        _write(tmp_path, _voxel_doc("a.npy"))
        doc, arrays = read_outputs(tmp_path, CAP)
        assert doc == _voxel_doc("a.npy")
        assert {k: v.tolist() for k, v in arrays.items()} == {"a.npy": [0.0, 1.0, 2.0]}

    @pytest.mark.parametrize(("make", "reason"), [
        (lambda out: None, "script emitted no aggregates (no result file)"),
        (lambda out: os.symlink("/etc/passwd", out / "result.json"),
         "result file is a symlink: refused"),
        (lambda out: (_write(out, {}), os.link(out / "result.json", out / "again")),
         "result file has more than one hard link: refused"),
        (lambda out: os.mkfifo(out / "result.json"), "result file is not a regular file: refused"),
        (lambda out: (out / "result.json").write_text("{nope"),
         "result file is not valid JSON (JSONDecodeError)"),
        (lambda out: (out / "result.json").write_text('{"x": NaN}'),
         "result file is not valid JSON (ValueError)"),
        (lambda out: _write(out, [1, 2]), "result file is not a JSON object"),
        (lambda out: (out / "result.json").write_bytes(b" " * (CAP + 1)),
         "result file is over the result limit: refused"),
        (lambda out: _write(out, _voxel_doc("../x.npy")),
         "an array file name is not a plain *.npy name: refused"),
        (lambda out: _write(out, _voxel_doc("gone.npy")),
         "an array file the result refers to is missing"),
        (lambda out: (_write(out, _voxel_doc("a.npy")), os.symlink("/etc/passwd", out / "a.npy")),
         "an array file is a symlink: refused"),
    ], ids=["missing", "symlink", "hardlink", "fifo", "bad-json", "nan", "not-object",
            "too-big", "npy-path", "npy-missing", "npy-symlink"])
    def test_anything_but_a_plain_result_is_refused(
            self, tmp_path: Path, make: Callable[[Path], object], reason: str) -> None:
        """Missing, linked, special, malformed or oversized outputs are refused by rule."""
        make(tmp_path)
        with pytest.raises(ResultRefused) as exc:
            read_outputs(tmp_path, CAP)
        assert exc.value.args[0] == reason


class TestContainerOutput:
    def test_only_the_last_strict_marker_line_counts(self) -> None:
        """The reason takes the runtime's last marker line; free text and forged forms do not count."""
        tail = (b"stimnet-runtime: KeyError at line 2\nstimnet-runtime: patient s00\n"
                b"stimnet-runtime: ValueError at line 9\n")
        assert marker(tail) == ("ValueError", "9")
        assert marker(b"stimnet-runtime: age=71 at line 5\n") is None
        assert marker(b"stimnet-runtime: Age71 at line 5\n") == ("an exception", "5")

    def test_logs_keep_the_last_bytes_as_bounded_lines(self) -> None:
        """Only the last log_bytes are kept, split into lines each cut to MAX_LOG_LINE_CHARS."""
        raw = b"first\n" + b"x" * 3000 + b"\nlast\n"
        assert log_lines(raw, 4000) == ["first", "x" * 2000, "last"]
        assert log_lines(raw, 8) == ["xx", "last"]
