"""Certificate rotation without restart, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request

import pytest
from cryptography import x509

from stimctl.client import AsyncClient, NotAuthenticated
from stimnet import pki as pkimod
from stimnetd.testing import CertFactory
from tests.helpers import client_config


def _server_serial(port: int, certs) -> int:  # type: ignore[no-untyped-def]
    """The serial of the certificate the server presents to a new connection."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.cert), str(certs.key))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_rotate_server_cert_and_revoke_client_without_restart(start_node,
                                                                    pki: CertFactory) -> None:
    """SIGHUP-reload: new connections get the new server cert; a revoked client holding an
    open channel is refused on its next call (well within max_connection_age)."""
    alice = pki.issue("alice", "researcher")
    bob = pki.issue("bob", "researcher")
    async with start_node("node-a", node={"max_connection_age_s": 2.0}) as d:
        addr = f"127.0.0.1:{d.port}"
        # In a thread: the in-process node answers TLS on this event loop.
        old = await asyncio.to_thread(_server_serial, d.port, alice)
        async with AsyncClient(client_config(alice, addr)) as a, \
                AsyncClient(client_config(bob, addr)) as b:
            assert (await a.info()).caller == "alice"
            assert (await b.info()).caller == "bob"
            # Rotate: a renewed certificate for the same node, written over the live files.
            node_dir = pki.base_dir / "node-node-a"
            renewed = pkimod.renew(pki.ca_dir, node_dir / "node-a.crt", out_dir=pki.base_dir / "new")
            shutil.copy(renewed.cert_path, node_dir / "node-a.crt")
            shutil.copy(renewed.key_path, node_dir / "node-a.key")
            pki.revoke("bob")
            d.reload()
            new = await asyncio.to_thread(_server_serial, d.port, alice)
            assert new == renewed.serial and new != old
            assert (await a.info()).caller == "alice"  # unaffected, same open channel
            with pytest.raises(NotAuthenticated, match="revoked"):
                await b.info()


def promtool_problems(body: str) -> list[str]:
    """`promtool check metrics` on an exposition: its complaints (none: it passes). Fails,
    not skips, under CI=true when promtool is missing (scripts/test.sh installs Debian's
    `prometheus` package, which ships it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (apt-get install prometheus) and CI=true")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                       text=True, timeout=60)
    problems = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 0 or problems, f"promtool exited {r.returncode}"
    return problems


async def test_metrics_endpoint_reports_rpcs_and_privacy(start_node, pki: CertFactory,
                                                         small_catalog: dict) -> None:
    """The Prometheus endpoint (loopback, opt-in) counts RPCs, privacy decisions and epsilon."""
    alice = pki.issue("alice", "researcher")
    async with start_node("node-a", catalogs=[small_catalog], metrics={"listen": "127.0.0.1:0"},
                          privacy={"dp": "optional"}) as d:
        assert isinstance(d.metrics_port, int) and d.metrics_port > 0
        async with AsyncClient(client_config(alice, f"127.0.0.1:{d.port}")) as c:
            await c.info()
            # One noised count over 20 subjects at epsilon 5 clears the noisy threshold
            # (7 subjects at scale 0.2) all but never.
            await c.query("SELECT count(*) FROM dbs_outcomes", epsilon=5.0)
        # The job's final state rides in the next group commit (within 20 ms): commit it.
        await d.store.flush()
        await d.refresh_metrics()  # the loop refreshes every 2 s; don't wait for it
        body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics",
                                      timeout=5).read().decode()
    def value(prefix: str) -> float:
        lines = [ln for ln in body.splitlines() if ln.startswith(prefix)]
        assert lines != [], f"no {prefix} in metrics"
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    assert value('stimnet_rpc_total{method="/stimnet.v1.JobService/RunJob",status="OK"}') == 1
    assert value("stimnet_rpc_latency_seconds_count") >= 2
    assert value('stimnet_privacy_decisions_total{decision="released"}') == 1
    assert value('stimnet_epsilon_spent_total{catalog="dbs_outcomes"}') == pytest.approx(5.0)
    assert value('stimnet_jobs{state="succeeded"}') == 1
    assert value('stimnet_jobs{state="running"}') == 0  # every state is reported, zeros too
    expires = value("stimnet_certificate_expiry_timestamp_seconds")
    assert expires == pytest.approx(d.tls.material.identity.not_after.timestamp())
    assert value('stimnet_peers{status="alive"}') == 0  # the node itself is no peer
    assert value('stimnet_build_info{version="') == 1
    assert value("process_resident_memory_bytes") > 0
    assert promtool_problems(body) == []
