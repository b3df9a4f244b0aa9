"""Where the node is and which files prove who the caller is: `client.toml`."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import grpc

from stimnet.errors import ConfigProblem

DEFAULT_CONFIG = Path("~/.config/stimnet/client.toml").expanduser()
_KEYS = ("address", "ca", "cert", "key", "timeout_s")
_REQUIRED = ("address", "ca", "cert", "key")


@dataclass(frozen=True)
class ClientConfig:
    """A node's address, the caller's certificate, key and CA, and the default deadline.

    Args:
        address: ``host:port`` of the node, e.g. ``"127.0.0.1:7443"``.
        ca: the federation CA's certificate (PEM), which the node's must chain to.
        cert: the caller's certificate (PEM); its role and name are who the node sees.
        key: the caller's private key (PEM); it also signs each job.
        timeout_s: the deadline of a single call; job streams get a multiple of it.
    """

    address: str
    ca: Path
    cert: Path
    key: Path
    timeout_s: float = 30.0

    @classmethod
    def load(cls, path: Path | str | None = None) -> ClientConfig:
        """Read a client TOML file; relative paths in it are relative to the file.

        Args:
            path: the file; by default ``~/.config/stimnet/client.toml``.

        Raises:
            ConfigProblem: the file is missing, unreadable, not TOML, or has an unknown or
                missing key (the message names which).
        """
        path = Path(path).expanduser() if path else DEFAULT_CONFIG
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigProblem(f"client config {path} does not exist "
                                "(pass --config FILE, or create it)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigProblem(f"client config {path} is unreadable: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigProblem(f"client config {path} is not valid TOML: {exc}") from None
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ConfigProblem(f"client config {path}: unknown key {unknown[0]!r}")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigProblem(f"client config {path}: missing key {missing[0]!r}")
        base = path.resolve().parent

        def rel(p: str) -> Path:
            q = Path(p).expanduser()
            return q if q.is_absolute() else base / q

        return cls(address=str(raw["address"]), ca=rel(raw["ca"]), cert=rel(raw["cert"]),
                   key=rel(raw["key"]), timeout_s=float(raw.get("timeout_s", 30.0)))

    def credentials(self) -> grpc.ChannelCredentials:
        """Mutual-TLS channel credentials from the three files, read now.

        Raises:
            ConfigProblem: a file cannot be read (the message names it).
        """
        try:
            return grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(), private_key=self.key.read_bytes(),
                certificate_chain=self.cert.read_bytes())
        except OSError as exc:
            raise ConfigProblem(f"cannot read {exc.filename}: {exc.strerror}") from None
