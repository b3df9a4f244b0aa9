"""Binding the node's port: gRPC's own TLS, or the TLS front in front of a private socket."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


async def bind(server: Any, front: Any, credentials: Any, host: str, port: int
               ) -> tuple[int, Path | None, str | None]:
    """(the port bound, the front's private directory, its socket); OSError if the port
    cannot be bound. `front` None: gRPC's TLS with `credentials()`."""
    inner_dir = socket = None
    if front is None:
        bound = server.add_secure_port(f"{host}:{port}", credentials())
    else:
        # Plaintext, on a unix socket only this user can reach, and useless without
        # the front's verdict. A short private path: sun_path holds 108 bytes.
        inner_dir = Path(tempfile.mkdtemp(prefix="stimnetd-"))
        socket = str(inner_dir / "grpc.sock")
        server.add_insecure_port(f"unix:{socket}")
        try:
            bound = await front.start(host, port, socket)
        except OSError:
            bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (address in use or not local)")
    return int(bound), inner_dir, socket
