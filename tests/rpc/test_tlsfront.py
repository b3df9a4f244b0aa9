"""The TLS front under real connections: ordering, backpressure, hostile bytes, cleanup."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import UTC, datetime, timedelta

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stimctl.client import AsyncClient
from stimnet.pki import load_cert
from stimnetd import tlsfront
from stimnetd.testing import CertFactory, foreign
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


async def test_unfinished_handshakes_are_bounded(start_node, pki: CertFactory) -> None:
    """Beyond `max_handshakes` silent connections, new ones are closed at once; a connection
    that completes its handshake frees its slot, and the node keeps serving."""
    alice = pki.issue("alice", "researcher")
    async with start_node(tls={"max_handshakes": 2}) as d:
        silent = [await asyncio.open_connection("127.0.0.1", d.port) for _ in range(2)]
        assert await _eventually(lambda: d.front.handshaking == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        await _until_closed(reader)
        # Closed while the earlier silent ones still wait out their handshake timeout.
        assert (d.front.handshaking, [r.at_eof() for r, _ in silent]) == (2, [False, False])
        writer.close()
        for _, w in silent:
            w.close()
        assert await _eventually(lambda: d.front.handshaking == 0)
        async with AsyncClient(client_config(alice, _addr(d))) as c:
            assert (await c.info()).caller == "alice"
        assert d.front.handshaking == 0
        # Only the one closed at once was refused (the silent ones hung up themselves).
        [closed] = await _handshake_refusals(d)
        assert "too many unfinished TLS handshakes (limits 2 in all, 32 from one host)" \
            in json.loads(closed.detail_json)["reason"]


async def test_one_host_cannot_take_every_handshake_slot(start_node) -> None:
    """Past `max_handshakes_per_host` silent connections from one address, that address's
    new connections are closed at once; the count is per host and returns to zero."""
    async with start_node(tls={"max_handshakes_per_host": 2}) as d:
        silent = [await asyncio.open_connection("127.0.0.1", d.port) for _ in range(2)]
        assert await _eventually(lambda: d.front._handshaking_by_host == {"127.0.0.1": 2})
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        await _until_closed(reader)
        # Closed while the earlier silent ones still wait out their handshake timeout.
        assert (d.front._handshaking_by_host, [r.at_eof() for r, _ in silent]) == (
            {"127.0.0.1": 2}, [False, False])
        writer.close()
        for _, w in silent:
            w.close()
        assert await _eventually(lambda: d.front._handshaking_by_host == {}
                                 and d.front.handshaking == 0)


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
