"""Test helpers shipped with the daemon, so integration tests elsewhere can build real PKIs.

Everything here writes real files under a directory the caller owns (a pytest tmp_path);
nothing is cached between instances.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from stimnet import pki

# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertPaths:
    """The files a TLS peer needs: its certificate, its key and the CA to trust."""

    cert: Path
    key: Path
    ca: Path


class CertFactory:
    """A throw-away federation CA under `base_dir`, issuing certificates per identity."""

    def __init__(self, base_dir: Path, *, common_name: str = "StimNet Test CA") -> None:
        self.base_dir = Path(base_dir)
        self.ca_dir = self.base_dir / "ca"
        pki.init_ca(self.ca_dir, common_name=common_name)

    @property
    def ca_cert_path(self) -> Path:
        return self.ca_dir / pki.CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.ca_dir / pki.CRL_FILE

    def issue(
        self,
        name: str,
        role: str,
        *,
        hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
        expired: bool = False,
        days: int = 30,
    ) -> CertPaths:
        """Issue into ``base_dir/<role>-<name>/`` (``<role>-<name>-expired/`` if expired).

        `hosts` apply to nodes only, so the default suits every role. An expired
        certificate ended a day ago, so a test can hold a valid and an expired one of the
        same identity side by side.
        """
        suffix = "-expired" if expired else ""
        out_dir = self.base_dir / f"{role}-{name}{suffix}"
        window: dict[str, datetime] = {}
        if expired:
            now = datetime.now(UTC)
            window = {
                "not_before": now - timedelta(days=days + 1),
                "not_after": now - timedelta(days=1),
            }
        issued = pki.issue(
            self.ca_dir,
            name,
            role,
            out_dir,
            hosts=hosts if role == "node" else (),
            days=days,
            **window,
        )
        return CertPaths(cert=issued.cert_path, key=issued.key_path, ca=out_dir / pki.CA_CERT)

    def revoke(self, name: str) -> list[int]:
        """Revoke every certificate of `name` and rewrite the CRL at `crl_path`."""
        return pki.revoke(self.ca_dir, name)

    def revocations(self) -> pki.RevocationList:
        """The current CRL, signature-checked."""
        return pki.RevocationList.load(self.crl_path, pki.load_cert(self.ca_cert_path))


def foreign(base_dir: Path) -> CertFactory:
    """An unrelated CA in ``base_dir/foreign`` for "wrong CA" tests.

    It uses the same common name as CertFactory's default, so a check that compared
    issuer names only, and not signatures, would wrongly accept its certificates.
    """
    return CertFactory(Path(base_dir) / "foreign")


# --------------------------------------------------------------------------- nodes


def shared_data(*parts: str) -> Path:
    """A path in the public test data: `$STIMNET_SHARED_DATA`, else the first
    `shared/data` beside the checkout or beside one of its parents (`../shared/data` in
    the usual layout). FileNotFoundError saying where it looked if none is there."""
    env = os.environ.get("STIMNET_SHARED_DATA")
    repo = Path(__file__).resolve().parents[1]
    roots = [Path(env)] if env else [d / "shared" / "data" for d in repo.parents]
    for root in roots:
        if (root / Path(*parts)).exists():
            return root / Path(*parts)
    raise FileNotFoundError(f"public test data {'/'.join(parts)!r} not found in "
                            f"{', '.join(map(str, roots))}: put the checkout beside "
                            "shared/data, or set STIMNET_SHARED_DATA to that directory")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_node_config(site_dir: Path, certs: CertPaths, name: str, *, port: int = 0,
                      catalogs: list[dict] | None = None, crl: Path | None = None,
                      **sections: dict) -> Path:
    """Write a node config TOML into `site_dir`; `sections` override/add tables."""
    import tomli_w

    site_dir.mkdir(parents=True, exist_ok=True)
    cfg: dict = {
        "node": {"name": name, "listen": f"127.0.0.1:{port}", "state_dir": str(site_dir / "state"),
                 "grace_s": 3.0, "admins": ["ops"]},
        "tls": {"ca": str(certs.ca), "cert": str(certs.cert), "key": str(certs.key)},
        "catalogs": catalogs or [],
        # Explicit, as a test of exact answers needs it: a node whose config says nothing
        # of [privacy] runs dp = "required" (config/policy.py). A test's `privacy` table
        # adds to this one.
        "privacy": {"dp": "off"},
    }
    if crl is not None:
        cfg["tls"]["crl"] = str(crl)
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = site_dir / "stimnetd.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


async def fake_node(certs: CertPaths, add_servicer: Any = None, servicer: Any = None,
                    also: tuple[tuple[Any, Any], ...] = (), *,
                    client_auth: bool = True) -> tuple[Any, int]:
    """A started in-process gRPC server with `certs` (mutual TLS, as a node's) serving
    `servicer` (added by its generated `add_…_to_server`), and each (add, servicer) of
    `also`, on a free loopback port: a stand-in node whose answers a test controls.
    `client_auth=False`: a TLS server that asks for no client certificate (and trusts no
    CA). Returns (server, port); stop it with `await server.stop(None)`."""
    import grpc

    server = grpc.aio.server()
    pairs = ((add_servicer, servicer), *also) if add_servicer is not None else also
    for add, serv in pairs:
        add(serv, server)
    key_cert = [(certs.key.read_bytes(), certs.cert.read_bytes())]
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        key_cert, root_certificates=certs.ca.read_bytes(), require_client_auth=True)
        if client_auth else grpc.ssl_server_credentials(key_cert))
    await server.start()
    return server, port


class DaemonProcess:
    """A real `stimnetd` process; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, config_path: Path, *, env: dict | None = None) -> None:
        import os
        import subprocess
        import sys

        self.config_path = config_path
        self.log_path = config_path.parent / "stimnetd.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stimnetd", "--config", str(config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, certs: CertPaths, address: str, timeout_s: float = 30.0) -> None:
        """Until the node answers a health check as the holder of `certs`; the node's log
        is in the error if it exits or does not serve within `timeout_s`."""
        import grpc

        from stimnet.health import wait_serving

        credentials = grpc.ssl_channel_credentials(
            root_certificates=certs.ca.read_bytes(), private_key=certs.key.read_bytes(),
            certificate_chain=certs.cert.read_bytes())
        try:
            await wait_serving(address, credentials, timeout_s=timeout_s, exited=self.proc.poll)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}:\n{self.log()}") from None

    def stop(self, sig: int | None = None, timeout_s: float = 30.0) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig if sig is not None else signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()
            self._remove_front_dir()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()
        self._remove_front_dir()

    def _remove_front_dir(self) -> None:
        """A killed node cannot remove its TLS front's private directory in /tmp, and a
        test that deletes its state directory would leave it for good: remove it here,
        under the state directory's lock, so a node still running there keeps its own."""
        import tomllib

        from stimnetd import listening
        from stimnetd.store.lock import StateDirLock, StateDirLocked

        if self.proc.poll() is None:
            return
        try:
            state_dir = Path(tomllib.loads(self.config_path.read_text())["node"]["state_dir"])
        except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
            return
        if not (state_dir / listening.MARKER).exists():
            return
        lock = StateDirLock(state_dir)
        try:
            lock.acquire()
        except (StateDirLocked, OSError):
            return
        try:
            listening.remove_predecessors(state_dir)
        finally:
            lock.release()


# --------------------------------------------------------------------------- sandbox


class FakeDockerApi:
    """Stands in for docker-py's low-level ``APIClient``: plays back container states.

    Each inspect_container() returns a container's next state, the last one repeating.
    `states` is one list for every container, or a list per container id; the fake names
    the containers it creates ``fake-1``, ``fake-2``, ... in order. kill() makes the
    killed container's state `killed_state` from then on (the engine's SIGKILL exit by
    default). `logs` is the containers' whole output, `stderr` the part logs() returns
    when asked for stderr alone. What the code under test did is kept in `created`
    (create_container's arguments, with `host_config` as given to create_host_config),
    `started`, `killed` and `removed`; a removed container is NotFound, as in the engine.
    """

    def __init__(self, states: list[dict[str, Any]] | dict[str, list[dict[str, Any]]],
                 logs: bytes = b"", *, stderr: bytes = b"",
                 killed_state: dict[str, Any] | None = None) -> None:
        self._states = states
        self._playing: dict[str, list[dict[str, Any]]] = {}
        self._logs, self._stderr = logs, stderr
        self._killed_state = killed_state or {"Status": "exited", "Running": False,
                                              "ExitCode": 137, "OOMKilled": False}
        self.created: list[dict[str, Any]] = []
        self.started: list[str] = []
        self.killed: list[str] = []
        self.removed: list[str] = []
        self.closed = False

    def _gone(self, cid: str) -> None:
        import docker.errors

        if cid in self.removed:
            raise docker.errors.NotFound(f"No such container: {cid}")

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return dict(kwargs)

    def create_container(self, **kwargs: Any) -> dict[str, Any]:
        self.created.append(kwargs)
        return {"Id": f"fake-{len(self.created)}"}

    def start(self, container: str, /) -> None:
        self._gone(container)
        self.started.append(container)

    def inspect_container(self, container: str, /) -> dict[str, Any]:
        self._gone(container)
        if container not in self._playing:
            states = (self._states if isinstance(self._states, list)
                      else self._states[container])
            self._playing[container] = list(states)
        playing = self._playing[container]
        return {"State": dict(playing.pop(0) if len(playing) > 1 else playing[0])}

    def kill(self, container: str, /) -> None:
        self._gone(container)
        self.killed.append(container)
        self._playing[container] = [self._killed_state]

    def logs(self, container: str, /, **kwargs: Any) -> bytes:
        self._gone(container)
        return self._logs if kwargs.get("stdout", True) else self._stderr

    def remove_container(self, container: str, /, **kwargs: Any) -> None:
        self._gone(container)
        self.removed.append(container)

    def containers(self, **kwargs: Any) -> list[dict[str, Any]]:
        """The containers this fake created and has not removed, as the engine lists them;
        of the filters, only ``label: ["key=value", ...]`` is applied."""
        wanted = dict(f.split("=", 1) for f in (kwargs.get("filters") or {}).get("label", ()))
        listed = []
        for i, c in enumerate(self.created, 1):
            labels = c.get("labels") or {}
            if f"fake-{i}" not in self.removed and wanted.items() <= labels.items():
                listed.append({"Id": f"fake-{i}", "Names": [f"/{c.get('name')}"],
                               "Labels": labels})
        return listed

    def close(self) -> None:
        self.closed = True
