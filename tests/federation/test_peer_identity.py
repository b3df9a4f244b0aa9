"""An address serves the node its certificate names, and only that node gets its jobs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stimnet.v1 import federation_pb2, federation_pb2_grpc
from stimnetd.config import TlsConfig
from stimnetd.federation.fanout import Target
from stimnetd.gossip.membership import Member
from stimnetd.gossip.transport import PeerUnreachable, ProbeMessage
from stimnetd.rpc.gossip_transport import GrpcGossipTransport
from stimnetd.rpc.peer_client import MAX_DETAIL_CHARS, GrpcSubJobTransport, PeerChannels
from stimnetd.rpc.peer_identity import PeerIdentityError, probe
from stimnetd.testing import CertFactory, CertPaths, fake_node, free_port
from stimnetd.tls import read_material
from tests.federation.test_federated_queries import _tiny_catalog
from tests.federation.test_signed_jobs import _signed as _signed_any


def _signed(client):  # type: ignore[no-untyped-def]
    """A federated job: what an entry relays to its peers."""
    return _signed_any(client, scope="federated")


def _material(fed, name: str):  # type: ignore[no-untyped-def]
    d = fed.tmp / "pki" / f"node-{name}"
    c = CertPaths(cert=d / f"{name}.crt", key=d / f"{name}.key", ca=d / "ca.crt")
    return read_material(TlsConfig(ca=c.ca, cert=c.cert, key=c.key, crl=None))


async def test_a_name_pointed_at_another_nodes_address_gets_no_job(federation,
                                                                   tmp_path: Path) -> None:
    """Gossip (or a config) that says site-c lives at site-b's address: the entry sees
    site-b's certificate there and sends nothing; with the right name, or none, the same
    transport delivers and the answer is attributed to the certificate's node."""
    cats = [[_tiny_catalog(tmp_path / f"t{i}", [float(a) for a in range(30, 60)])]
            for i in range(3)]
    async with federation(cats) as fed, fed.client() as c:
        channels = PeerChannels(_material(fed, "site-a"))
        transport = GrpcSubJobTransport(channels, "site-a")
        events: list[tuple] = []

        async def sink(*ev: object) -> None:
            events.append(ev)

        try:
            wrong = await transport.run_subjob(Target(fed.address(1), "site-c"), _signed(c),
                                               "r1", 10, sink)
            audit_b = [r.action for r in await fed.daemons[1].store.audit_rows()]
            right = await transport.run_subjob(Target(fed.address(1), "site-b"), _signed(c),
                                               "r2", 10, sink)
            unnamed = await transport.run_subjob(Target(fed.address(2)), _signed(c), "r3", 10,
                                                 sink)
        finally:
            await channels.close()
    assert wrong.state == "failed" and "served by node 'site-b', not node 'site-c'" in wrong.detail
    assert events[0][:2] == ("site-c", "failed")
    assert "subjob" not in audit_b and "release" not in audit_b  # site-b never saw the job
    assert (right.state, right.site, right.n) == ("done", "site-b", 30)
    assert (unnamed.state, unnamed.site) == ("done", "site-c")


async def test_probe_names_the_problem_with_a_foreign_or_missing_server(
        federation, tmp_path: Path) -> None:
    """An address serving another CA's certificate, or nothing, is not attributed to anyone."""
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed:
        material = _material(fed, "site-a")
        other = CertFactory(tmp_path / "other-ca").issue("site-a", "node", hosts=("127.0.0.1",))
        server, port = await fake_node(other, client_auth=False)
        try:
            with pytest.raises(PeerIdentityError, match="TLS handshake failed"):
                # In a thread, as PeerChannels runs it: the server shares this event loop.
                await asyncio.to_thread(probe, f"127.0.0.1:{port}", material, 5)
        finally:
            await server.stop(None)
        with pytest.raises(PeerIdentityError, match="cannot connect"):
            await asyncio.to_thread(probe, f"127.0.0.1:{free_port()}", material, 5)
        assert (await asyncio.to_thread(probe, fed.address(0), material, 5)).name == "site-a"


class _Liar(federation_pb2_grpc.FederationServiceServicer):
    async def Ping(self, request, context):  # type: ignore[no-untyped-def]
        return federation_pb2.GossipMessage(sender="site-b", sender_incarnation=1)


async def test_gossip_reply_claiming_another_sender_is_not_believed(federation,
                                                                     tmp_path: Path) -> None:
    """A member (valid certificate 'mallory') replying to a ping as 'site-b' would keep
    site-b alive at mallory's address; the reply is treated as no reply at all."""
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed:
        mallory = fed.pki.issue("mallory", "node", hosts=("127.0.0.1",))
        server, port = await fake_node(
            mallory, federation_pb2_grpc.add_FederationServiceServicer_to_server, _Liar())
        channels = PeerChannels(_material(fed, "site-a"))
        me = Member("site-a", fed.address(0), 1, "alive", 0.0, ())
        try:
            for _ in range(2):  # the cached identity is dropped and learnt again: same verdict
                with pytest.raises(PeerUnreachable, match="is node 'mallory' but its reply claims"):
                    await GrpcGossipTransport(channels).ping(
                        f"127.0.0.1:{port}", ProbeMessage.from_entries("site-a", [me]), 5)
        finally:
            await channels.close()
            await server.stop(None)


async def test_an_address_that_never_answers_the_handshake_times_out_and_says_so(
        federation, tmp_path: Path) -> None:
    """A listener that accepts and then says nothing (a stopped process looks the same):
    the probe gives up at its deadline, and the site is reported timed out, naming it."""
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _r, w: held.append(w), "127.0.0.1", 0)
    address = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        material = _material(fed, "site-a")
        with pytest.raises(TimeoutError, match="no TLS handshake within 0.3s"):
            await asyncio.to_thread(probe, address, material, 0.3)
        channels = PeerChannels(material)
        events: list[tuple] = []

        async def sink(*ev: object) -> None:
            events.append(ev)

        try:
            out = await GrpcSubJobTransport(channels, "site-a").run_subjob(
                Target(address, "site-x"), _signed(c), "r1", 0.3, sink)
        finally:
            await channels.shutdown()
            silent.close()
            for w in held:
                w.close()
            await silent.wait_closed()
    assert out.state == "timed_out" and "0.3s" in out.detail  # the deadline or the probe
    assert events == [("site-x", "timed_out", out.detail, 0)]


class _Mute(federation_pb2_grpc.FederationServiceServicer):
    async def RunSubJob(self, request, context):  # type: ignore[no-untyped-def]
        return
        yield  # an empty stream: no outcome at all


async def test_a_peer_that_ends_its_stream_without_an_outcome_is_failed_and_watchers_hear_it(
        federation, tmp_path: Path) -> None:
    """The outcome is decided at the entry, so the entry reports it as the site's event."""
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        out, events = await _ask(fed, c, "mute", _Mute(), named=False)
    assert (out.site, out.state) == ("mute", "failed") and "without an outcome" in out.detail
    assert events == [("mute", "failed", out.detail, 0)]


class _Garbler(federation_pb2_grpc.FederationServiceServicer):
    """A node with a valid certificate whose answers are malformed in a given way: its
    answer document, or the states it reports (each after a well-formed answer)."""

    def __init__(self, name: str, doc: str, states: tuple[str, ...] = ("done",),
                 detail: str = "", hang: bool = False) -> None:
        self._name, self._doc, self._states, self._detail = name, doc, states, detail
        self._hang = hang

    async def RunSubJob(self, request, context):  # type: ignore[no-untyped-def]
        from stimnet.v1 import common_pb2

        yield federation_pb2.SubJobEvent(partial=common_pb2.ResultFrame(
            header=common_pb2.ResultHeader(header_json='{"doc": ' + self._doc + ', "arrays": {}}')))
        for state in self._states:
            yield federation_pb2.SubJobEvent(site=common_pb2.SiteEvent(
                site=self._name, state=state, n=30, detail=self._detail))
        if self._hang:  # the stream stays open past the sub-job's 10 s deadline
            await asyncio.sleep(60)


async def _ask_garbler(fed, c, garbler_servicer: _Garbler):  # type: ignore[no-untyped-def]
    return await _ask(fed, c, garbler_servicer._name, garbler_servicer)


async def _ask(fed, c, name: str, servicer, *, named: bool = True):  # type: ignore[no-untyped-def]
    """Run one sub-job against a hostile node (a valid certificate named `name`) on
    loopback, the target named or not; (outcome, site events the entry reported)."""
    outcomes, events = await ask_node(fed, c, name, servicer, named=named)
    return outcomes[0], events


async def ask_node(fed, c, name: str, servicer, *, named: bool = True,  # type: ignore[no-untyped-def]
                   times: int = 1, small: bool = False):
    """`times` sub-jobs, one after another, to a node serving `servicer` (a valid
    certificate named `name`) on loopback, with the transport's `small`; (outcomes,
    site events the entry reported)."""
    server, port = await fake_node(fed.pki.issue(name, "node", hosts=("127.0.0.1",)),
                                   federation_pb2_grpc.add_FederationServiceServicer_to_server,
                                   servicer)
    channels = PeerChannels(_material(fed, "site-a"))
    events: list[tuple] = []

    async def sink(*ev: object) -> None:
        events.append(ev)

    transport = GrpcSubJobTransport(channels, "site-a")
    try:
        outcomes = [await transport.run_subjob(
            Target(f"127.0.0.1:{port}", name if named else None), _signed(c), f"r{i}", 10,
            sink, small=small) for i in range(times)]
    finally:
        await channels.shutdown()
        await server.stop(None)
    return outcomes, events


class _CallsOnly(_Garbler):
    """A node that serves RunSubJob but not the SubJobs stream (its calls counted)."""

    calls = 0

    async def RunSubJob(self, request, context):  # type: ignore[no-untyped-def]
        _CallsOnly.calls += 1
        async for ev in super().RunSubJob(request, context):
            yield ev


async def test_a_peer_without_sub_job_streams_fails_the_site_and_is_sent_nothing(
        federation, tmp_path: Path) -> None:
    """Every node serves SubJobs: a peer that answers the stream without its handshake
    fails each small sub-job, saying so, and none is sent to it as a call of its own."""
    _CallsOnly.calls = 0
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        outcomes, events = await ask_node(fed, c, "plain", _CallsOnly("plain", '{"partials": []}'),
                                          times=2, small=True)
    detail = "node 'plain' does not serve the SubJobs stream; the sub-job was not sent"
    assert [(o.state, o.detail) for o in outcomes] == [("failed", detail)] * 2
    assert events == [("plain", "failed", detail, 0)] * 2
    assert _CallsOnly.calls == 0


@pytest.mark.parametrize("doc, problem", [
    ('[1, 2]', "the answer is not an object"),
    ('{"partials": "all of them"}', "partials must be a list"),
    ('{"partials": [], "epsilon": "lots"}', "epsilon 'lots' is not a non-negative number"),
    ('{"partials": [], "epsilon": -1}', "epsilon -1 is not a non-negative number"),
    ('{"partials": [], "mechanism": {"x": 1}}', "mechanism {'x': 1} is not a name"),
    ('{"partials": [{"name": "n", "kind": "count", "group": [], "n": 5, "meta": {}, '
     '"stats": {}, "cell_mask": null, "suppressed_reason": null}]}',
     "partial 'n': its stats {} are not the count layout {'n': (1,)}"),
    ('{"partials": [{"name": "h", "kind": "histogram", "group": [], "n": 5, '
     '"meta": {"edges": [3, 1]}, "stats": {}, "cell_mask": null, "suppressed_reason": null}]}',
     "partial 'h': its meta does not describe a histogram output (ValueError: edges are not "
     "two or more increasing numbers)"),
])
async def test_a_peers_malformed_answer_fails_that_site_and_says_so(
        federation, tmp_path: Path, doc: str, problem: str) -> None:
    """A peer (valid certificate, its own name) whose answer is not partial aggregates:
    that site is failed, naming the problem, and the watchers hear it after its 'done';
    nothing of it reaches the combined answer."""
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        outcome, events = await _ask_garbler(fed, c, _Garbler("garbler", doc))
    assert (outcome.state, outcome.site, outcome.partials) == ("failed", "garbler", [])
    assert outcome.detail == f"malformed partial aggregates: {problem}"
    assert [e[:2] for e in events] == [("garbler", "done"), ("garbler", "failed")]


async def test_a_peers_states_are_checked(federation, tmp_path: Path) -> None:
    """Only the states a site can be in are relayed to the researcher, and a peer's detail
    text is bounded before it is relayed and stored."""
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        bad, bad_events = await _ask_garbler(fed, c, _Garbler("garbler", '{"partials": []}',
                                                              ("pwned",)))
        long, _ = await _ask_garbler(fed, c, _Garbler("verbose", '{"partials": []}',
                                                      ("suppressed",), detail="x" * 100_000))
    assert (bad.state, bad.detail) == ("failed", "node 'garbler' sent an unknown state 'pwned'")
    assert [e[:2] for e in bad_events] == [("garbler", "failed")]
    assert long.state == "suppressed" and len(long.detail) == MAX_DETAIL_CHARS + 1


async def test_a_peers_outcome_ends_its_sub_job(federation, tmp_path: Path) -> None:
    """A peer's first outcome is its answer: what it sends after it ('running', another
    outcome) is never read, relayed or stored, and the answer does not wait for the
    stream to end (this peer holds it open past the sub-job's deadline)."""
    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        outcome, events = await _ask_garbler(fed, c, _Garbler(
            "garbler", '{"partials": []}', ("done", "running", "failed"), hang=True))
    assert (outcome.state, outcome.site) == ("done", "garbler")
    assert [e[:2] for e in events] == [("garbler", "done")]


async def test_a_peers_progress_is_relayed_once_per_state(federation, tmp_path: Path) -> None:
    """Progress events are relayed to the researcher and kept with the job: a peer sending
    20,000 'running' events before its outcome gets one kept (by the job's event hub)."""
    from stimnetd.jobs.events import JobEventHub

    cats = [[_tiny_catalog(tmp_path / "t", [float(a) for a in range(30, 60)])]]
    async with federation(cats) as fed, fed.client() as c:
        outcome, events = await _ask_garbler(fed, c, _Garbler(
            "chatty", '{"partials": []}', ("accepted",) + ("running",) * 20_000 + ("done",)))
    hub = JobEventHub()
    job = hub.open("j")
    for event in events:
        await hub.fanout_events("j").relay(*event)
    assert outcome.state == "done"
    assert [(e.site, e.state) for e in job.sites] == [("chatty", "accepted"),
                                                       ("chatty", "running"), ("chatty", "done")]
