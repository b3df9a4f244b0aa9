"""A throw-away PostgreSQL server for the tests: initdb and pg_ctl from Debian's
`postgresql` package (scripts/test.sh installs it where apt is available), a cluster in a
temp directory, listening on a free 127.0.0.1 port with its socket in that directory,
trust authentication (nothing but this machine's loopback can reach it), fsync off (the
tests check semantics, not durability). As root it runs as the `postgres` user, since
PostgreSQL refuses to run as root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

USER = "stimnet"


def find_bindir() -> Path | None:
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(initdb).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    bindir: Path
    root: Path
    port: int
    run_as: str | None

    @property
    def base_url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}"

    def url(self, database: str) -> str:
        return f"{self.base_url}/{database}"

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *argv] if self.run_as else list(argv)

    @classmethod
    def start(cls) -> PgServer:
        bindir = find_bindir()
        if bindir is None:
            raise FileNotFoundError("no PostgreSQL server binaries (initdb) found; "
                                    "apt-get install postgresql")
        run_as = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="stimnet-pg-"))
        if run_as:
            pw = pwd.getpwnam(run_as)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        server = cls(bindir, root, _free_port(), run_as)
        data = root / "data"
        subprocess.run(server._cmd(str(bindir / "initdb"), "-D", str(data), "-U", USER,
                                   "--auth=trust", "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        opts = (f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        subprocess.run(server._cmd(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                                   "-l", str(root / "log"), "-w", "-t", "60", "start"),
                       check=True, capture_output=True, timeout=90)
        return server

    def stop(self) -> None:
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"),
                                 "-m", "immediate", "-w", "stop"),
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)
