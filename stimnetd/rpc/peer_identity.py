"""Which node serves an address: read the name in the certificate it presents.

gRPC Python checks a server's certificate against the federation CA and the address's
host, but does not tell the caller whose certificate it was. Several nodes may share a
host (and so a host name in their certificates), and gossip relays other members'
addresses: a member could claim that site B lives at its own address and receive B's
share of every query, answering as B. So before a node sends a peer a researcher's
sub-job, or believes a gossip reply, it learns who serves that address with a TLS
handshake of its own (same CA, same client certificate) and compares names. Once per
address: `PeerChannels` caches the answer until the node's certificate is reloaded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import time

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto

from stimnet.pki import Identity, PkiError, verify_chain
from stimnetd.tls import TlsMaterial


class PeerIdentityError(Exception):
    """The address did not present a certificate this node can attribute to a node."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isascii() or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise PeerIdentityError(f"{address!r} is not host:port")
    try:
        host.encode("idna")
    except UnicodeError:
        raise PeerIdentityError(f"{address!r} does not name a host") from None
    return host, int(port)


def probe(address: str, material: TlsMaterial, timeout_s: float) -> Identity:
    """The identity in the certificate served at `address` (blocking; run in a thread).

    Raises TimeoutError when no handshake completes within `timeout_s`, and
    PeerIdentityError when the address cannot be reached or its certificate is not one of
    this federation's (other CA, expired, revoked, no node identity).
    """
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    slow = f"{address} completed no TLS handshake within {timeout_s:g}s"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        raise TimeoutError(slow) from None
    except OSError as exc:
        raise PeerIdentityError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    try:
        sock.setblocking(False)
        conn = SSL.Connection(_context(material), sock)
        if not _is_ip(host):
            conn.set_tlsext_host_name(host.encode("idna"))
        conn.set_connect_state()
        _handshake(conn, sock, deadline, slow)
        leaf = conn.get_peer_certificate(as_cryptography=True)
        with contextlib.suppress(SSL.Error, OSError):  # a courtesy close_notify only
            conn.shutdown()
    finally:
        sock.close()
    if leaf is None:
        raise PeerIdentityError(f"{address} presented no certificate")
    if leaf.serial_number in material.revoked:
        raise PeerIdentityError(f"the certificate served at {address} is revoked")
    try:
        return verify_chain(leaf, material.ca_cert)
    except PkiError as exc:
        raise PeerIdentityError(f"the certificate served at {address}: {exc}") from None


def _context(material: TlsMaterial) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    certs = x509.load_pem_x509_certificates(material.cert_pem)
    ctx.use_certificate(certs[0])
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(load_pem_private_key(material.key_pem, password=None))  # type: ignore[arg-type]
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(material.ca_cert))  # type: ignore[union-attr]
    # OpenSSL checks the chain against our CA; a failure ends the handshake.
    ctx.set_verify(SSL.VERIFY_PEER, lambda _c, _x, _e, _d, ok: bool(ok))
    ctx.set_alpn_protos([b"h2"])  # the TLS front serves HTTP/2 only
    return ctx


def _handshake(conn: SSL.Connection, sock: socket.socket, deadline: float, slow: str) -> None:
    wanted: tuple[list[socket.socket], list[socket.socket]]
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            wanted = ([sock], [])
        except SSL.WantWriteError:
            wanted = ([], [sock])
        except SSL.Error as exc:
            raise PeerIdentityError(f"TLS handshake failed: {_reason(exc)}") from None
        except OSError as exc:
            raise PeerIdentityError(f"connection lost during the TLS handshake: {exc}") from None
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not any(select.select(*wanted, [], remaining)[:2]):
            raise TimeoutError(slow)


def _reason(exc: SSL.Error) -> str:
    # pyOpenSSL's args: [[(library, function, reason), ...]]; the reasons say it.
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    return "; ".join(str(e[-1]) for e in errors if e) or type(exc).__name__


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
