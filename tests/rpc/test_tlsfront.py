"""The TLS front under real connections: ordering, backpressure, hostile bytes, handshake
limits, cleanup."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stimctl.client import AsyncClient, ClientConfig
from stimnet import errors
from stimnet.pki import load_cert
from stimnetd import tlsfront
from stimnetd.testing import CertFactory, CertPaths, DaemonProcess, foreign, free_port, write_node_config
from tests.helpers import client_config


def _addr(daemon) -> str:  # type: ignore[no-untyped-def]
    return f"127.0.0.1:{daemon.port}"


async def _eventually(condition, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll `condition` until it holds (True) or `timeout_s` passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _until_closed(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> None:
    """Return once the node has closed a connection (EOF or reset); fails on a hang."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout=timeout_s):
            pass  # a TLS alert may precede the close
    except ConnectionResetError:
        pass


# -- the verdict, as a unit ------------------------------------------------------------


def test_judge_names_each_reason(pki: CertFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The verdict names why a certificate is refused and keeps the claimed identity apart."""
    ca = load_cert(pki.ca_cert_path)
    good = load_cert(pki.issue("alice", "researcher").cert)
    expired = load_cert(pki.issue("alice", "researcher", expired=True).cert)
    other = load_cert(foreign(tmp_path).issue("alice", "researcher").cert)

    ok = tlsfront.judge([good], ca, "10.0.0.1:5")
    assert ok.identity is not None and ok.identity.name == "alice" and ok.refusal is None
    none = tlsfront.judge([], ca, "10.0.0.1:5")
    assert none.identity is None and "none was presented" in (none.refusal or "")
    late = tlsfront.judge([expired], ca, "10.0.0.1:5")
    assert late.identity is None and "expired at" in (late.refusal or "")
    assert (late.claimed_name, late.claimed_role) == ("alice", "researcher")
    alien = tlsfront.judge([other], ca, "10.0.0.1:5")
    assert alien.identity is None and "was not issued by" in (alien.refusal or "")
    early = tlsfront.judge([good], ca, "10.0.0.1:5", now=datetime.now(UTC) - timedelta(days=2))
    assert early.identity is None and "not valid until" in (early.refusal or "")


# -- through a real daemon -------------------------------------------------------------


async def test_many_fresh_connections_in_parallel_all_succeed(start_node,
                                                              pki: CertFactory) -> None:
    """Requests that arrive with the handshake are forwarded in order: bytes sent while
    the inner connection is opening do not overtake earlier ones."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        async def one() -> str:
            async with AsyncClient(client_config(alice, _addr(d))) as c:
                return (await c.info()).caller

        for _ in range(5):
            assert await asyncio.gather(*[one() for _ in range(16)]) == ["alice"] * 16
        # Closed connections leave nothing behind.
        assert await _eventually(lambda: not d.front._verdicts
                                 and d.front.open_connections == 0)


async def test_large_messages_cross_the_front_intact(pki: CertFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """8 MiB each way, 4 calls at once, through TLS, the front and a real gRPC server:
    exercises backpressure in both directions."""
    node = pki.issue("node-a", "node")
    alice = pki.issue("alice", "researcher")

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request[::-1]

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 32 << 20),
                                      ("grpc.max_send_message_length", 32 << 20)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}),))
    sock = str(tmp_path / "inner.sock")
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    front = tlsfront.TlsFront(node.ca.read_bytes(), node.cert.read_bytes(), node.key.read_bytes())
    port = await front.start("127.0.0.1", 0, sock)
    try:
        creds = client_config(alice, f"127.0.0.1:{port}").credentials()
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[
                ("grpc.max_receive_message_length", 32 << 20)]) as ch:
            call = ch.unary_unary("/t.Echo/Call")
            payloads = [bytes(range(256)) * (32768 + i) for i in range(4)]
            replies = await asyncio.gather(*[call(p, timeout=60) for p in payloads])
        assert [r == p[::-1] for r, p in zip(replies, payloads, strict=True)] == [True] * 4
    finally:
        front.close()
        await server.stop(None)


async def _handshake_refusals(daemon) -> list:  # type: ignore[no-untyped-def]
    await daemon.store.flush()  # group-committed
    return [r for r in await daemon.store.audit_rows() if r.action == "tls-handshake"]


async def test_garbage_and_silence_are_dropped_audited_and_the_node_keeps_serving(
        start_node, pki: CertFactory) -> None:
    """Bytes that are not TLS close the connection; a connection that never completes a
    handshake is closed after the handshake timeout; neither disturbs other callers. Each
    is in the audit log, keyed by the caller's address, with why (there is no call to
    answer with a status)."""
    alice = pki.issue("alice", "researcher")
    async with start_node(tls={"handshake_timeout_s": 1.5}) as d:
        # The silent connection opens first, so its handshake timer runs out first: the
        # garbage is closed before it only if it is closed at once, not at its timeout.
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", d.port)
        silent_from = f"127.0.0.1:{silent_writer.get_extra_info('sockname')[1]}"
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        garbage_from = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
        await writer.drain()
        closed: list[str] = []

        async def watch(name: str, r: asyncio.StreamReader) -> None:
            await _until_closed(r)
            closed.append(name)
        await asyncio.gather(watch("silent", silent_reader), watch("garbage", reader))
        assert closed == ["garbage", "silent"]
        writer.close()
        silent_writer.close()

        async with AsyncClient(client_config(alice, _addr(d))) as c:
            assert (await c.info()).caller == "alice"
        garbage, silent = await _handshake_refusals(d)
        assert (garbage.actor, garbage.role, garbage.decision) == (garbage_from, "anonymous",
                                                                   "denied")
        assert json.loads(garbage.detail_json)["reason"].startswith("TLS handshake failed: ")
        assert (silent.actor, silent.decision) == (silent_from, "denied")
        assert json.loads(silent.detail_json)["reason"] == "no TLS handshake within 1.5s"
        assert garbage.seq < silent.seq  # audited in the order they were closed
        verified = await d.store.verify_audit()
        assert (verified.ok, verified.first_bad_seq, verified.problem) == (True, None, "")


async def test_a_flood_of_failed_handshakes_is_audited_in_brief(start_node) -> None:
    """Failed handshakes share the per-source budget of refused calls: the first few a
    minute get an entry each, the rest one count (at the minute's end, or at shutdown),
    so no one who can reach the port can fill the audit log."""
    from stimnetd.store import Store

    async with start_node(tls={"refusals_audited_per_minute": 2}) as d:
        for _ in range(6):
            reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
            writer.write(b"\x16\x03\x01\x00\x05hello")  # a record too short to be a hello
            await writer.drain()
            await _until_closed(reader)
            writer.close()
        assert len(await _handshake_refusals(d)) == 2
        path = d.store.path
    store = Store(path)
    await store.open()
    try:
        [condensed] = [r for r in await store.audit_rows() if r.action == "rpc"]
        verified = await store.verify_audit()
        assert (verified.ok, verified.first_bad_seq, verified.problem) == (True, None, "")
    finally:
        await store.close()
    detail = json.loads(condensed.detail_json)
    assert (condensed.actor, condensed.decision) == ("127.0.0.1", "denied-condensed")
    assert detail["suppressed"] == 4 and detail["methods"] == {"tls-handshake": 4}


async def _silent(n: int, host: str = "127.0.0.1", port: int = 0) -> list:  # type: ignore[type-arg]
    """`n` connections from `host` that never start a TLS handshake."""
    return [await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
            for _ in range(n)]


def _hang_up(conns: list) -> None:  # type: ignore[type-arg]
    for _, writer in conns:
        writer.close()


async def test_a_connection_over_the_limit_waits_for_a_slot(start_node, pki: CertFactory) -> None:
    """Beyond `max_handshakes` unfinished handshakes a new connection is not closed: it
    waits, its ClientHello unread, and gets the first slot that frees."""
    alice = pki.issue("alice", "researcher")
    async with start_node(tls={"max_handshakes": 2}) as d:
        silent = await _silent(2, port=d.port)
        assert await _eventually(lambda: d.front.handshaking == 2)
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            call = asyncio.ensure_future(c.info())
            assert await _eventually(lambda: d.front.slots.waiting == 1)
            assert (call.done(), d.front.handshaking) == (False, 2)
            _hang_up(silent[:1])
            assert (await call).caller == "alice"
        _hang_up(silent[1:])
        assert await _eventually(lambda: (d.front.handshaking, d.front.slots.waiting) == (0, 0))
        # Nothing was refused: the silent ones hung up themselves.
        assert await _handshake_refusals(d) == []


async def test_one_host_cannot_take_every_handshake_slot(start_node) -> None:
    """Past `max_handshakes_per_host` unfinished handshakes from one address, that address's
    new connections wait while another address's are admitted; the counts return to zero."""
    async with start_node(tls={"max_handshakes_per_host": 2}) as d:
        silent = await _silent(3, port=d.port)
        assert await _eventually(lambda: (d.front.slots.by_host, d.front.slots.waiting)
                                 == ({"127.0.0.1": 2}, 1))
        other = await _silent(1, "127.0.0.2", d.port)
        assert await _eventually(lambda: d.front.slots.by_host
                                 == {"127.0.0.1": 2, "127.0.0.2": 1})
        _hang_up(silent[:1])  # the waiting one takes its slot
        assert await _eventually(lambda: (d.front.slots.by_host, d.front.slots.waiting)
                                 == ({"127.0.0.1": 2, "127.0.0.2": 1}, 0))
        _hang_up(silent[1:] + other)
        assert await _eventually(lambda: d.front.slots.by_host == {}
                                 and d.front.handshaking == 0)


async def test_a_connection_that_cannot_get_a_slot_is_told_so_with_the_limit_alert(
        start_node) -> None:
    """A connection over the limits when the waiting room (as large as `max_handshakes`) is
    full, or that waited `handshake_wait_s`, gets the limit alert (user_canceled) and an
    orderly close, never a reset or a certificate alert; each is audited with why."""
    alert = bytes([0x15, 3, 3, 0, 2, 2, errors.HANDSHAKE_LIMIT_ALERT])
    async with start_node(tls={"max_handshakes": 2, "handshake_wait_s": 0.5}) as d:
        silent = await _silent(4, port=d.port)  # two handshaking, two waiting
        assert await _eventually(lambda: (d.front.handshaking, d.front.slots.waiting) == (2, 2))
        [(reader, writer)] = await _silent(1, port=d.port)
        assert await asyncio.wait_for(reader.read(), timeout=5) == alert  # then EOF
        writer.close()
        for waited, _ in silent[2:]:
            assert await asyncio.wait_for(waited.read(), timeout=5) == alert
        assert d.front.handshaking == 2  # the handshaking ones keep their slots
        _hang_up(silent)
        reasons = sorted(json.loads(r.detail_json)["reason"] for r in await _handshake_refusals(d))
        limits = "too many unfinished TLS handshakes (limits 2 in all, 32 from one host) and "
        assert reasons == [limits + "the waiting room is full"] + [
            limits + "waited 0.5s for a slot"] * 2


async def test_many_first_connections_from_one_address_all_connect_or_are_told_the_limit(
        start_node, pki: CertFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """132 handshakes at once from one address (32 of them never finish, so the 100 clients
    must queue): every client connects, or is told the node is limiting handshakes, never
    that a certificate was refused; a client that distrusts the node's certificate, or
    holds another CA's, still hears that."""
    alice = pki.issue("alice", "researcher")
    alien = foreign(tmp_path).issue("alice", "researcher")
    async with start_node() as d:
        silent = await _silent(32, port=d.port)
        assert await _eventually(lambda: d.front.slots.by_host == {"127.0.0.1": 32})

        async def first_call() -> str:
            try:
                async with AsyncClient(client_config(alice, _addr(d))) as c:
                    return (await c.info()).caller
            except errors.HandshakeLimited as exc:
                return str(exc)

        calls = asyncio.gather(*[first_call() for _ in range(100)])
        assert await _eventually(lambda: d.front.slots.waiting == 100, timeout_s=30)
        _hang_up(silent)
        got = await calls
        limited = [g for g in got if g != "alice"]
        assert all("is limiting concurrent TLS handshakes" in g for g in limited), limited
        assert len(got) == 100 and not any("certificate" in g for g in got)

        distrusting = ClientConfig(_addr(d), ca=alien.ca, cert=alice.cert, key=alice.key)
        with pytest.raises(errors.ConnectionFailed, match="we refused the node's certificate"):
            async with AsyncClient(distrusting) as c:
                await c.info()
        with pytest.raises(errors.Unauthenticated, match="was not issued by"):
            async with AsyncClient(client_config(
                    CertPaths(cert=alien.cert, key=alien.key, ca=alice.ca), _addr(d))) as c:
                await c.info()


async def test_plain_tls_client_without_h2_gets_no_data(start_node, pki: CertFactory) -> None:
    """A TLS client that does not speak HTTP/2 is answered by the inner gRPC server's
    protocol error, never by anything from the node's data."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert_path))
        ctx.load_cert_chain(str(alice.cert), str(alice.key))
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port, ssl=ctx,
                                                       server_hostname="localhost")
        writer.write(b"GET /stimnet.v1.NodeService/ListCatalogs HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), timeout=5)
        assert b"dbs_outcomes" not in reply and b"site-a" not in reply
        writer.close()


async def test_health_check_answers_serving_through_the_front(start_node,
                                                              pki: CertFactory) -> None:
    """The standard health check answers SERVING through the default TLS front."""
    alice = pki.issue("alice", "researcher")
    async with start_node() as d:
        assert d.front is not None
        creds = client_config(alice, _addr(d)).credentials()
        async with grpc.aio.secure_channel(_addr(d), creds) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_daemon_process_holds_a_waiting_clienthello_and_names_its_limit(
        tmp_path, pki: CertFactory) -> None:  # type: ignore[no-untyped-def]
    """In the real daemon (uvloop, which may deliver a ClientHello that arrived before the
    front paused the connection), a waiting connection's handshake still waits: with the
    one slot held, a client is told the limit; once the slot is free, it connects."""
    node, alice = pki.issue("limits-node", "node"), pki.issue("alice", "researcher")
    port = free_port()
    cfg = write_node_config(tmp_path / "limits-node", node, "limits-node", port=port,
                            tls={"max_handshakes_per_host": 1, "handshake_wait_s": 0.3})
    proc = DaemonProcess(cfg)
    addr = f"127.0.0.1:{port}"
    try:
        await proc.wait_healthy(alice, addr)
        silent = await _silent(1, port=port)
        with pytest.raises(errors.HandshakeLimited, match="limiting concurrent TLS handshakes"):
            async with AsyncClient(client_config(alice, addr, timeout_s=1.5)) as c:
                await c.info()
        _hang_up(silent)
        async with AsyncClient(client_config(alice, addr)) as c:
            assert (await c.info()).caller == "alice"
    finally:
        assert proc.stop() == 0
