"""Binding the node's port: gRPC's own TLS, or the TLS front in front of a private socket."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

# In the state directory: where the front's private socket directory of the last start is.
MARKER = "front-socket-dir"
PREFIX = "stimnetd-"


def private_dir(state_dir: Path | None) -> Path:
    """A fresh private directory for the front's socket. A node killed by SIGKILL cannot
    remove its own, so the next start of the same state directory removes the one the
    marker names: one instance per state directory (store/lock.py, taken before the port
    is bound) means its owner is gone. Only a `stimnetd-` directory directly in the
    temporary directory is ever removed."""
    marker = state_dir / MARKER if state_dir is not None else None
    if state_dir is not None:
        remove_predecessors(state_dir)
    inner = Path(tempfile.mkdtemp(prefix=PREFIX))
    if marker is not None:
        try:
            marker.write_text(str(inner))
        except OSError:
            pass  # a full state volume: the directory is removed at a clean stop anyway
    return inner


def remove_predecessors(state_dir: Path) -> None:
    """Remove the private directory the marker in `state_dir` names. Only for a caller
    that holds the state directory's one-instance lock (or knows its daemon is gone)."""
    try:
        old = Path((state_dir / MARKER).read_text().strip())
    except (OSError, ValueError):
        return
    if old.name.startswith(PREFIX) and old.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(old, ignore_errors=True)


async def bind(server: Any, front: Any, credentials: Any, host: str, port: int,
               state_dir: Path | None = None) -> tuple[int, Path | None, str | None]:
    """(the port bound, the front's private directory, its socket); OSError if the port
    cannot be bound. `front` None: gRPC's TLS with `credentials()`."""
    inner_dir = socket = None
    if front is None:
        bound = server.add_secure_port(f"{host}:{port}", credentials())
    else:
        # Plaintext, on a unix socket only this user can reach, and useless without
        # the front's verdict. A short private path: sun_path holds 108 bytes.
        inner_dir = private_dir(state_dir)
        socket = str(inner_dir / "grpc.sock")
        server.add_insecure_port(f"unix:{socket}")
        try:
            bound = await front.start(host, port, socket)
        except OSError:
            bound = 0
    if bound == 0:
        if inner_dir is not None:  # the daemon exits: nobody else would remove it
            shutil.rmtree(inner_dir, ignore_errors=True)
        raise OSError(f"cannot listen on {host}:{port} (address in use or not local)")
    return int(bound), inner_dir, socket
