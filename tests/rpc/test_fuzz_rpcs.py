"""Fuzz every RPC of two real daemons (separate processes, loopback, real mTLS) with
seeded-random requests: random field values of each field's type, signed job payloads
mutated from valid ones, and raw bytes that are not the request message; inside the
multiplexed streams (JobService/Session, FederationService/SubJobs) too. As a researcher,
an admin and a peer node, mostly in roles the method allows.

Nothing a client sends may produce INTERNAL or UNKNOWN, as a call's status or as a
multiplexed call's CallStatus, nor a traceback in a daemon's log; both daemons still answer
health and GetStatus at the end and stop cleanly.

Bounded at STIMNET_FUZZ_SECONDS of calls (default 60; set it higher to fuzz longer).
STIMNET_FUZZ_SEED picks the requests (fixed under CI=true, random otherwise; the seed is in
every failure message, to rerun a failure with it).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import re
import secrets
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from stimnet.v1 import admin_pb2, federation_pb2, jobs_pb2, node_pb2
from stimnetd.rpc.roles import allowed_roles
from stimnetd.testing import CertFactory, CertPaths, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config
from tests.rpc import fuzzing
from tests.rpc.fuzzing import Hook, Signer

SECONDS = float(os.environ.get("STIMNET_FUZZ_SECONDS", "60"))
SEED = int(os.environ.get("STIMNET_FUZZ_SEED")
           or (26 if os.environ.get("CI") == "true" else secrets.randbelow(2**32)))
WORKERS = 8
# Calls per RPC (and calls inside each multiplexed stream) that got past the role check:
# fewer and the test would pass without having fuzzed that RPC.
MIN_ADMITTED = 20
BAD = frozenset({"INTERNAL", "UNKNOWN", "HUNG"})
NODES = ("fuzz-a", "fuzz-b")
MODULES = (node_pb2, jobs_pb2, federation_pb2, admin_pb2, health_pb2, reflection_pb2)
# Whose replies carry the CallStatus of each call multiplexed on the stream.
MULTIPLEXED = ("/stimnet.v1.JobService/Session", "/stimnet.v1.FederationService/SubJobs")


@dataclass(frozen=True)
class Target:
    path: str
    method: MethodDescriptor
    request: type[Message]
    response: type[Message]

    @property
    def streams_in(self) -> bool:
        return self.method.client_streaming

    @property
    def streams_out(self) -> bool:
        return self.method.server_streaming


def targets() -> list[Target]:
    """Every RPC of every service the daemon serves, from the protobuf descriptors."""
    return [Target(f"/{svc.full_name}/{m.name}", m, fuzzing.request_class(m.input_type),
                   fuzzing.request_class(m.output_type))
            for mod in MODULES for svc in mod.DESCRIPTOR.services_by_name.values()
            for m in svc.methods]


@dataclass
class Who:
    name: str
    role: str
    certs: CertPaths
    signer: Signer
    channels: list[grpc.aio.Channel] = field(default_factory=list)


@dataclass
class Tally:
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    admitted: collections.Counter[str] = field(default_factory=collections.Counter)
    inner: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=lambda: ["0" * 24])
    # GLM jobs, for their later rounds, each with the round it is at per node.
    fits: list[tuple[Message, dict[str, int]]] = field(default_factory=list)
    # Signs the GLM fits: a researcher of their own, whose released cohorts (all of them
    # the whole catalog) the other queries' do not make overlap refusals of.
    fitter: Signer | None = None

    def status(self, target: str, role: str, name: str, details: str, sent: Any, *,
               inner: bool = False) -> None:
        self.codes[(target + (" (inner)" if inner else ""), name)] += 1
        self.reasons[f"{target.rsplit('/', 1)[1]} {name} {re.sub(r'[0-9a-f]{8,}|[0-9.]+', '#', details)[:90]}"] += 1
        if name not in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            (self.inner if inner else self.admitted)[target] += 1
        if name in BAD and sum(b.startswith(target) for b in self.bad) < 3:
            self.bad.append(f"{target}{' (multiplexed call)' if inner else ''} as {role}: "
                            f"{name}: {details[:300]!r}; sent {str(sent)[:300]}")


# --------------------------------------------------------------------------- requests


def rounds(tally: Tally, who: Who, node: str) -> Hook:
    """A third of a peer's sub-jobs are rounds of a few GLM fits: round 1 opens a fit at
    the site, later ones (mostly the next the site owes) carry a random parameter vector."""
    def hook(rng: random.Random, msg: Message, f: FieldDescriptor | None) -> bool:
        if who.role != "node" or tally.fitter is None or rng.random() < 0.67:
            return False
        if len(tally.fits) < 3 or rng.random() < 0.05:
            tally.fits.append((fuzzing.glm_job(rng, tally.fitter, who.name), {}))
        job, owed = rng.choice(tally.fits[-3:])
        msg.job.CopyFrom(job)
        msg.round = owed.get(node, 1) if rng.random() < 0.8 else rng.choice((0, 2, 7, 2**32 - 1))
        owed[node] = min(msg.round + 1, 2**32 - 1)
        msg.beta.extend(fuzzing.rand_float(rng) if rng.random() < 0.3 else rng.uniform(-3, 3)
                        for _ in range(rng.choice((3, 3, 3, 2, 0))))
        msg.entry_node, msg.request_id = who.name, fuzzing.rand_str(rng)[:100]
        return True
    return hook


def gossip(sender: str) -> Hook:
    """Half the gossip messages are well formed (one entry for their sender, as SWIM
    needs), so that their members reach the membership."""
    def hook(rng: random.Random, msg: Message, f: FieldDescriptor | None) -> bool:
        if rng.random() < 0.5:
            return False
        msg.sender, msg.sender_incarnation = sender, rng.choice((0, 1, 2, 2**64 - 1))
        me = msg.members.add(name=sender, address=rng.choice(("127.0.0.1:1", "", "x:y")),
                             incarnation=msg.sender_incarnation, status="alive",
                             last_heard=fuzzing.rand_float(rng))
        me.catalogs.add(name=fuzzing.CATALOG, schema_version=rng.choice((1, 2, 2**32 - 1)))
        for _ in range(rng.choice((0, 1, 3))):
            fuzzing.fill(rng, msg.members.add(), {})
        return True
    return hook


def _job_id_hook(tally: Tally) -> Hook:
    def hook(rng: random.Random, msg: Message, f: FieldDescriptor | None) -> bool:
        if f is None or rng.random() < 0.3:
            return False
        setattr(msg, f.name, rng.choice(tally.job_ids[-200:]))
        return True
    return hook


def _pick(values: Callable[[random.Random], Any], p: float = 0.7) -> Hook:
    """A field hook: `values(rng)` with probability `p`, else a random value."""
    def hook(rng: random.Random, msg: Message, f: FieldDescriptor | None) -> bool:
        if f is None or rng.random() >= p:
            return False
        setattr(msg, f.name, values(rng))
        return True
    return hook


def hooks(tally: Tally, who: Who, researcher: Signer, others: list[Signer],
          node: str) -> dict[str, Hook]:
    entry = who.name if who.role == "node" else node

    def signed(rng: random.Random, msg: Message, f: FieldDescriptor | None) -> bool:
        if rng.random() < 0.15:
            return False
        fuzzing.signed_job(rng, msg, researcher, others, entry)
        return True

    short = _pick(lambda rng: rng.choice((0.3, 1.0, 2.0, 3.0)), 0.8)
    ids = _job_id_hook(tally)
    table: dict[str, Hook] = {}

    def well_formed(body: str) -> Hook:
        def hook(rng: random.Random, msg: Message, f: FieldDescriptor | None) -> bool:
            """Half the multiplexed calls are well formed, so that they reach the domain."""
            if rng.random() < 0.5:
                return False
            msg.id, msg.timeout_s = rng.randint(1, 2**20), rng.choice((1.0, 2.0, 3.0))
            fuzzing.fill(rng, getattr(msg, body), table)
            return True
        return hook

    def present(rng: random.Random, msg: Message, f: FieldDescriptor | None) -> bool:
        """A signed job is usually there (without one, a job request goes no further)."""
        if f is None or rng.random() < 0.1:
            return False
        fuzzing.fill(rng, getattr(msg, f.name), table)
        return True

    table.update({
        "stimnet.v1.SessionCall": well_formed("run"), "stimnet.v1.SubJobCall": well_formed("start"),
        "stimnet.v1.SignedJob": signed, "stimnet.v1.SubmitJobRequest.job": present,
        "stimnet.v1.SubJobRequest.job": present, "stimnet.v1.GossipMessage": gossip(who.name),
        "stimnet.v1.SubJobRequest": rounds(tally, who, node),
        **{f"stimnet.v1.{m}.id": ids for m in ("GetJobRequest", "CancelJobRequest",
                                               "WatchJobRequest", "GetResultRequest",
                                               "ReviewJobRequest")},
        "stimnet.v1.SessionCall.timeout_s": short, "stimnet.v1.SubJobCall.timeout_s": short,
        "stimnet.v1.SessionCall.id": _pick(lambda rng: rng.randint(1, 4)),
        "stimnet.v1.SubJobCall.id": _pick(lambda rng: rng.randint(1, 4)),
        "stimnet.v1.SubJobRequest.round": _pick(lambda rng: rng.choice((0, 1, 2))),
        "stimnet.v1.GossipMessage.sender": _pick(lambda rng: who.name),
        "stimnet.v1.MemberState.name": _pick(lambda rng: rng.choice(NODES)),
        "stimnet.v1.DescribeCatalogRequest.name": _pick(lambda rng: fuzzing.CATALOG),
        "stimnet.v1.ExportAuditRequest.since": _pick(lambda rng: time.time() - 2, 0.8),
        "grpc.health.v1.HealthCheckRequest.service": _pick(
            lambda rng: rng.choice(("", "stimnet.v1.JobService"))),
        "grpc.reflection.v1alpha.ServerReflectionRequest.file_containing_symbol": _pick(
            lambda rng: rng.choice(("stimnet.v1.JobService", "stimnet.v1.SignedJob"))),
        "grpc.reflection.v1alpha.ServerReflectionRequest.file_by_filename": _pick(
            lambda rng: rng.choice(("stimnet/v1/jobs.proto", "stimnet/v1/common.proto"))),
    })
    return table


def request_bytes(rng: random.Random, target: Target | type[Message], fill_hooks: dict[str, Hook]
                  ) -> tuple[bytes, str]:
    """One request's bytes (a random message, or raw bytes near it) and what it was."""
    cls = target.request if isinstance(target, Target) else target
    msg = fuzzing.fill(rng, cls(), fill_hooks)
    valid = msg.SerializeToString()
    if rng.random() < 0.75:
        return valid, str(msg).replace("\n", " ")
    raw = fuzzing.raw_request(rng, valid, cls.DESCRIPTOR)
    return raw, f"raw {raw[:120]!r} ({len(raw)} bytes)"


# --------------------------------------------------------------------------- calls


def _deadline(target: Target) -> float:
    """Long enough for a small query; health's Watch never ends by itself."""
    if target.path == "/grpc.health.v1.Health/Watch":
        return 0.5
    if target.streams_in:
        return 8.0
    return 3.0 if target.streams_out else 5.0


async def call(rng: random.Random, target: Target, who: Who, channel: grpc.aio.Channel,
               tally: Tally, fill_hooks: dict[str, Hook]) -> None:
    """Make one fuzzed call of `target` as `who` and record its status(es); sometimes the
    same call two or three times at once (a replayed nonce racing its original)."""
    if target.streams_in:
        # Rarely (costly) more calls than a stream runs at once (multiplex.MAX_RUNNING).
        count = 300 if rng.random() < 0.01 else rng.choice((0, 1, 2, 3, 8, 20))
        sent = [request_bytes(rng, target, fill_hooks) for _ in range(count)]
    else:
        sent = [request_bytes(rng, target, fill_hooks)]
    channels = [channel] + ([rng.choice(who.channels) for _ in range(rng.randint(1, 2))]
                            if rng.random() < 0.07 else [])
    # grpc's client itself refuses values that are not printable ASCII.
    metadata = (("x-stimnet-request-id", rng.choice(("", " ", "x" * 5000, "r 1;%s'\"\\"))),
                ("x-fuzz-bin", rng.randbytes(64))) if rng.random() < 0.1 else None
    # Some calls end early, while the daemon is working on them: by a deadline that
    # passes, or cancelled by the client.
    cut = rng.random()
    timeout = rng.choice((0.001, 0.01, 0.05, 0.2)) if cut < 0.05 else _deadline(target)
    cancel_after = rng.choice((0.0, 0.005, 0.05, 0.3)) if cut > 0.95 else None
    await asyncio.gather(*(_bounded(_one(target, who, ch, tally, sent, metadata, timeout,
                                         cancel_after), timeout, target, who, tally, sent)
                           for ch in channels))


async def _bounded(one: Any, timeout: float, target: Target, who: Who, tally: Tally,
                   sent: list[tuple[bytes, str]]) -> None:
    """A call that outlives its deadline by far is a hang (recorded as one)."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout + 30):
            await one
        if time.monotonic() - began > timeout + 3:
            tally.reasons[f"slow {target.path} {time.monotonic() - began:.0f}s over {timeout}"] += 1
    except TimeoutError:
        tally.status(target.path, who.role, "HUNG", f"still running {timeout + 30:g} s after "
                     "it started", "; ".join(w for _, w in sent))


async def _one(target: Target, who: Who, channel: grpc.aio.Channel, tally: Tally,
               sent: list[tuple[bytes, str]], metadata: Any, timeout: float,
               cancel_after: float | None) -> None:
    writer = None
    what = "; ".join(w for _, w in sent)
    if target.streams_in:
        rpc: Any = (channel.stream_stream if target.streams_out else channel.stream_unary)(
            target.path)(timeout=timeout, metadata=metadata)
        writer = asyncio.create_task(_write(rpc, [b for b, _ in sent]))
    else:
        rpc = (channel.unary_stream if target.streams_out else channel.unary_unary)(
            target.path)(sent[0][0], timeout=timeout, metadata=metadata)
    if cancel_after is not None:
        asyncio.get_running_loop().call_later(cancel_after, rpc.cancel)
    try:
        seen: set[int] = set()
        if target.streams_out:
            async for reply in rpc:
                inspect_reply(target, who, tally, reply, what, seen)
        else:
            inspect_reply(target, who, tally, await rpc, what, seen)
        tally.status(target.path, who.role, "OK", "", what)
    except grpc.aio.AioRpcError as err:
        tally.status(target.path, who.role, _code(err), err.details() or "", what)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if cancel_after is None or (task is not None and task.cancelling()):
            raise  # not (only) the test's own cancel of the call: a deadline of _bounded's
        tally.status(target.path, who.role, "CLIENT_CANCELLED", "", what)
    finally:
        if writer is not None:
            # The call has its status, so what is left unwritten is moot; and a write on a
            # call the client cancelled before it started never returns (grpc's client).
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


def _code(err: grpc.aio.AioRpcError) -> str:
    """The call's status; CLIENT_WRITE_CUT when the client library made it: a write still
    in flight (a large message) when the server ended the call fails in grpc's client, which
    then reports INTERNAL 'Internal error from Core' in place of the server's status. The
    server's own INTERNAL would also leave a traceback in its log, which is checked."""
    if err.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (
            err.debug_error_string() or ""):
        return "CLIENT_WRITE_CUT"
    return err.code().name


async def _write(rpc: Any, messages: list[bytes]) -> None:
    """Write `messages` on a client-streaming call until the server ends it. Written by
    hand, not from an iterator: grpc's own iterator-writer turns a write after the server's
    status into a client-made INTERNAL 'Internal error from Core' (grpc/grpc#36066), which
    would hide the status the server sent."""
    try:
        for m in messages:
            await rpc.write(m)
        await rpc.done_writing()
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 - grpc raises several kinds
        pass  # the call has ended (or the test cancelled it): its status says why


def inspect_reply(target: Target, who: Who, tally: Tally, reply: bytes, sent: str,
                  seen: set[int]) -> None:
    """Check a reply: a multiplexed call's status (a call counts once, with its status or
    as OK at its first event), and every job's and site's detail (a job that failed with
    an internal error is one too); keep job ids to ask about later."""
    try:
        msg = target.response.FromString(reply)
    except DecodeError:
        return
    if target.path in MULTIPLEXED:
        if msg.HasField("status"):
            tally.status(target.path, who.role, msg.status.code, msg.status.message, sent,
                         inner=True)
        elif msg.id not in seen:
            tally.status(target.path, who.role, "OK", "", sent, inner=True)
        seen.add(msg.id)
    for detail in _details(msg, tally.job_ids):
        tally.reasons[f"detail {re.sub(r'[0-9a-f]{8,}|[0-9.]+', '#', detail)[:90]}"] += 1
        if "internal error" in detail:
            tally.status(target.path, who.role, "INTERNAL", f"in a reply: {detail}", sent)


def _details(msg: Message, job_ids: list[str]) -> list[str]:
    """The `detail` of every Job and SiteEvent in `msg` (ids of Jobs go to `job_ids`)."""
    found = []
    if msg.DESCRIPTOR.full_name == "stimnet.v1.Job" and len(job_ids) < 10_000:
        job_ids.append(msg.id)  # type: ignore[attr-defined]
    for f, value in msg.ListFields():
        if f.name == "detail" and f.type == FieldDescriptor.TYPE_STRING:
            found.append(value)
        elif f.message_type is not None and f.message_type.full_name != "stimnet.v1.ResultFrame" \
                and not f.message_type.GetOptions().map_entry:
            for sub in (value if f.is_repeated else [value]):
                found += _details(sub, job_ids)
    return found


async def worker(rng: random.Random, plan: Any, people: dict[str, Who], tally: Tally,
                 until: float) -> None:
    signers = [w.signer for w in people.values()]
    while time.monotonic() < until:
        target = next(plan)
        roles = allowed_roles(target.path)
        allowed = [w for w in people.values() if w.role in roles] or list(people.values())
        who = rng.choice(allowed) if rng.random() < 0.85 else rng.choice(list(people.values()))
        i = rng.randrange(len(NODES))
        tally.calls[target.path] += 1
        await call(rng, target, who, who.channels[i], tally,
                   hooks(tally, who, people["researcher"].signer, signers, NODES[i]))


# --------------------------------------------------------------------------- daemons


async def start_daemons(tmp: Path, pki: CertFactory, catalog: dict, ops: CertPaths,
                        stack: AsyncExitStack) -> list[DaemonProcess]:
    ports = [free_port() for _ in NODES]
    procs = []
    # The two sites' policies differ, so that both ways are fuzzed: noise optional and
    # scripts reviewed at one, noise required and scripts run without review at the other.
    policies = ({"privacy": {"dp": "optional"}, "scripts": {"policy": "review"}},
                {"privacy": {"dp": "required"}, "scripts": {"policy": "auto"}})
    for i, name in enumerate(NODES):
        cfg = write_node_config(
            tmp / name, pki.issue(name, "node"), name, port=ports[i], catalogs=[catalog],
            crl=pki.crl_path, logging={"level": "warning"}, privacy=policies[i]["privacy"],
            federation={"peers": [f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i],
                        "subjob_timeout_s": 5.0},
            # No sandbox image of this name: a script job approved or run here fails with
            # a reason instead of starting a container.
            scripts={"image": "stimnet-fuzz-no-such-image", **policies[i]["scripts"]})
        proc = DaemonProcess(cfg)
        stack.callback(proc.kill)
        procs.append(proc)
    await asyncio.gather(*(p.wait_healthy(ops, f"127.0.0.1:{port}", timeout_s=60)
                           for p, port in zip(procs, ports, strict=True)))
    return procs


async def identities(certs_by_role: dict[str, CertPaths], procs: list[DaemonProcess],
                     stack: AsyncExitStack) -> dict[str, Who]:
    people = {}
    for role, certs in certs_by_role.items():
        name = certs.cert.stem
        who = Who(name, role, certs, Signer(certs))
        for proc in procs:
            address = proc.config_path.read_text().split('listen = "', 1)[1].split('"', 1)[0]
            ch = grpc.aio.secure_channel(address, client_config(certs, address).credentials(),
                                         options=[("grpc.max_receive_message_length", 64 << 20)])
            stack.push_async_callback(ch.close)
            who.channels.append(ch)
        people[role] = who
    return people


async def served_services(channel: grpc.aio.Channel) -> set[str]:
    """The services the daemon serves, by its reflection service."""
    call = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=15)
    reply = await call.read()
    call.cancel()
    return {s.name for s in reply.list_services_response.service}


async def still_answering(people: dict[str, Who]) -> list[str]:
    """What each daemon fails to answer after the fuzz: health and GetStatus."""
    problems = []
    for i, ch in enumerate(people["admin"].channels):
        try:
            health = await ch.unary_unary(
                "/grpc.health.v1.Health/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString)(
                health_pb2.HealthCheckRequest(), timeout=15)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(f"{NODES[i]}: health {health.status}")
            await ch.unary_unary("/stimnet.v1.NodeService/GetStatus")(b"", timeout=15)
        except grpc.aio.AioRpcError as err:
            problems.append(f"{NODES[i]}: {err.code().name} {err.details()}")
    return problems


def log_problems(procs: list[DaemonProcess]) -> list[str]:
    """Tracebacks (from our logging, grpc's or Python's own) and error-level lines in the
    daemons' logs (stdout and stderr): nothing a client sends should cause either."""
    found = []
    for name, proc in zip(NODES, procs, strict=True):
        log = proc.log()
        for m in re.finditer(r'Traceback|"level": "(error|critical)"', log):
            found.append(f"{name}: {log[max(0, m.start() - 400):m.start() + 1500]}")
    return found[:5]


# --------------------------------------------------------------------------- the test


async def test_no_input_makes_an_internal_error(tmp_path: Path, pki: CertFactory,
                                                small_catalog: dict) -> None:
    """Every RPC, fuzzed for STIMNET_FUZZ_SECONDS: no INTERNAL, UNKNOWN or traceback."""
    print(f"fuzz seed {SEED} (STIMNET_FUZZ_SEED), {SECONDS:g} s (STIMNET_FUZZ_SECONDS)")
    rng = random.Random(SEED)
    all_targets = targets()
    tally = Tally()
    async with AsyncExitStack() as stack:
        certs = {"researcher": pki.issue("fuzz-alice", "researcher"),
                 "admin": pki.issue("ops", "admin"), "node": pki.issue("fuzz-peer", "node")}
        procs = await start_daemons(tmp_path, pki, small_catalog, certs["admin"], stack)
        people = await identities(certs, procs, stack)
        tally.fitter = Signer(pki.issue("fuzz-bob", "researcher"))
        # The fuzz covers whatever the daemon serves (a service added later must be added
        # to MODULES).
        assert await served_services(people["admin"].channels[0]) == {
            t.path.split("/")[1] for t in all_targets}
        order = list(all_targets)
        rng.shuffle(order)
        plan = itertools.cycle(order)
        started = time.monotonic()
        workers = [asyncio.create_task(worker(random.Random(rng.random()), plan, people, tally,
                                              started + SECONDS)) for _ in range(WORKERS)]
        _, late = await asyncio.wait(workers, timeout=SECONDS + 90)
        for task in late:
            task.print_stack()
            task.cancel()
        assert not late, f"{len(late)} fuzz workers still calling 90 s past the budget (seed {SEED})"
        for task in workers:
            task.result()  # the test's own errors
        elapsed = time.monotonic() - started
        answering = await still_answering(people)
        exits = {name: proc.stop() for name, proc in zip(NODES, procs, strict=True)}
    total, inner = sum(tally.calls.values()), sum(tally.inner.values())
    print(f"{total} calls and {inner} multiplexed calls in {elapsed:.0f} s: "
          f"{total / elapsed:.0f} calls/s; codes {sorted(tally.codes.items())}")
    print("\n".join(f"{n:6d} {r}" for r, n in tally.reasons.most_common(400)))
    seed = f"(seed {SEED}: rerun with STIMNET_FUZZ_SEED={SEED})"
    assert not tally.bad, f"internal errors {seed}:\n" + "\n".join(tally.bad)
    assert not (found := log_problems(procs)), f"logged {seed}:\n" + "\n".join(found)
    assert answering == [], f"not answering after the fuzz {seed}: {answering}"
    assert exits == dict.fromkeys(NODES, 0), seed
    thin = {t.path: tally.admitted[t.path] for t in all_targets
            if tally.admitted[t.path] < MIN_ADMITTED}
    thin |= {f"{m} (multiplexed)": tally.inner[m] for m in MULTIPLEXED
             if tally.inner[m] < MIN_ADMITTED}
    assert thin == {}, f"too few calls past the role check {seed}"
