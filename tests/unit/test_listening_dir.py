"""The TLS front's private socket directory does not outlive a killed node's next start."""

from __future__ import annotations

import tempfile
from pathlib import Path

from stimnetd.listening import MARKER, private_dir


def test_the_next_start_removes_the_directory_a_killed_node_left(tmp_path: Path) -> None:
    first = private_dir(tmp_path)  # the node is then killed: nothing removes it
    (first / "grpc.sock").write_text("")
    second = private_dir(tmp_path)
    try:
        assert not first.exists() and second.is_dir()
        assert (tmp_path / MARKER).read_text() == str(second)
    finally:
        second.rmdir()


def test_a_marker_naming_anything_else_is_not_followed(tmp_path: Path) -> None:
    """Only a stimnetd- directory directly in the temporary directory is removed."""
    keep = [tmp_path / "stimnetd-not-in-tmp", Path(tempfile.mkdtemp(prefix="other-"))]
    for path in keep:
        path.mkdir(exist_ok=True)
        (tmp_path / MARKER).write_text(str(path))
        made = private_dir(tmp_path)
        made.rmdir()
        assert path.is_dir()
    keep[1].rmdir()
