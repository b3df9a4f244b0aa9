"""Builds the daemon's object graph and runs it: the only module that knows every part.

Outside dependencies (store, clock, TLS, transports, Docker) are built here and passed in.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stimnet import signing
from stimnet.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    federation_pb2,
    federation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from stimnetd import __version__, listening, memtrim
from stimnetd.catalog import CatalogSet, load_catalogs
from stimnetd.catalog.advice import catalog_warnings
from stimnetd.config import Config, ConfigError, GossipSettings
from stimnetd.config.advice import config_warnings, privacy_risks
from stimnetd.federation.fanout import Fanout
from stimnetd.federation.peers import StaticPeers
from stimnetd.federation.subjob import PeerSubJobs
from stimnetd.gossip import GossipConfig, Swim, SystemClock
from stimnetd.gossip.membership import Member, MemberChange
from stimnetd.jobs.scripts import SandboxScripts
from stimnetd.jobs.service import JobService
from stimnetd.metrics import Metrics
from stimnetd.node import NodeState
from stimnetd.privacy.noise import NoiseMechanism
from stimnetd.privacy.policy import PrivacyPolicy
from stimnetd.query.sparse_images import site_images
from stimnetd.rpc.admin_servicer import AdminServicer
from stimnetd.rpc.federation_servicer import FederationServicer
from stimnetd.rpc.gossip_transport import GrpcGossipTransport, StoreMembers
from stimnetd.rpc.guard import AuthContextIdentities, FrontIdentities, Guard, Revocations
from stimnetd.rpc.jobs_servicer import JobServicer
from stimnetd.rpc.node_servicer import NodeServicer
from stimnetd.rpc.peer_client import GrpcSubJobTransport, PeerChannels
from stimnetd.rpc.refusals import RefusalLimiter
from stimnetd.sandbox import SANDBOX_VERSION, SandboxRunner
from stimnetd.sandbox.backend import script_runner
from stimnetd.sandbox.image import check_image
from stimnetd.site import LocalSite
from stimnetd.site.policy import ScriptPolicy
from stimnetd.store.opening import site_store
from stimnetd.store.space import StorageGuard
from stimnetd.supervisor import Supervisor
from stimnetd.systemd import Notifier
from stimnetd.tls import ServerTls
from stimnetd.tlsfront import TlsFront

if TYPE_CHECKING:
    from stimnetd.sandbox.kube import KubeRunner

log = structlog.get_logger("stimnetd")

SERVICE_NAMES = (
    node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    federation_pb2.DESCRIPTOR.services_by_name["FederationService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


def gossip_config(settings: GossipSettings) -> GossipConfig:
    overrides = {k: v for k, v in {
        "gossip_interval": settings.gossip_interval_s, "probe_interval": settings.probe_interval_s,
        "probe_timeout": settings.probe_timeout_s, "suspicion_mult": settings.suspicion_mult,
        "indirect_checks": settings.indirect_checks, "fanout": settings.fanout}.items()
        if v is not None}
    try:
        return GossipConfig.wan(**overrides) if settings.profile == "wan" \
            else GossipConfig(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"[gossip]: {exc}") from None


class JobVerifier:
    """Checks signed jobs against this node's CA and current CRL (both reloadable)."""

    def __init__(self, *, ca_cert: Callable[[], Any], revocations: Revocations,
                 max_age_s: float) -> None:
        self._ca_cert = ca_cert
        self._revocations = revocations
        self.max_age_s = max_age_s
        self._chains: dict[bytes, Any] = {}

    def __call__(self, signed: signing.SignedJob, *, fresh: bool = True) -> signing.VerifiedJob:
        return signing.verify(signed, ca_cert=self._ca_cert(),
                              revoked=self._revocations.serials,
                              max_age_s=self.max_age_s if fresh else float("inf"),
                              chains=self._chains)

    def forget_chains(self) -> None:
        """After a reload: the CA may have changed."""
        self._chains.clear()


class Daemon:
    def __init__(self, config: Config, *, notifier: Notifier | None = None,
                 wrap_gossip_transport: Callable[[Any], Any] | None = None) -> None:
        self.config = config
        self.gossip_config = gossip_config(config.gossip)
        self._wrap_gossip = wrap_gossip_transport
        self.notifier = notifier or Notifier()
        self.store = site_store(config)
        self.tls = ServerTls(config.tls)
        me = self.tls.material.identity
        if (me.role, me.name) != ("node", config.node.name):
            # Peers know this node by its certificate: gossip refuses a sender that differs
            # from it, and the entry refuses an address serving another name.
            raise ConfigError(f"{config.source}: [node].name: {config.node.name!r}, but the "
                              "certificate "
                              f"{config.tls.cert} is for {me.role} {me.name!r}: they must be "
                              "the same node")
        self.revocations = Revocations(self.tls.material.revoked)
        self.catalogs: CatalogSet = load_catalogs(config.catalogs)
        self.membership: Swim | None = None
        self.metrics = Metrics(__version__)
        self.sandbox = self._sandbox(config) if config.scripts.policy != "deny" else None
        self.site = self._local_site()
        self.verifier = JobVerifier(ca_cert=lambda: self.tls.material.ca_cert,
                                    revocations=self.revocations,
                                    max_age_s=config.federation.request_max_age_s)
        self.peer_channels = PeerChannels(self.tls.material)
        self.fanout = Fanout(
            site=self.site, holds_catalog=lambda name: name in self.catalogs.names(),
            peers=StaticPeers(node=config.node.name, peers=tuple(config.federation.peers),
                              membership=lambda: self.membership,
                              own_addresses=lambda: {f"{config.node.host}:{self.port}",
                                                     self.advertise}),
            transport=GrpcSubJobTransport(self.peer_channels, config.node.name),
            timeout_s=config.federation.subjob_timeout_s)
        self.jobs, self.subjobs = self._jobs()
        self.started_at = time.time()
        self.port: int | None = None
        self.inner_socket: str | None = None  # plaintext gRPC socket behind the TLS front
        self._inner_dir: Path | None = None
        self.metrics_port: int | None = None
        self.advertise: str | None = None
        self._server: grpc.aio.Server | None = None
        self.guard: Guard | None = None
        self.front = self._front()
        self._health = health.aio.HealthServicer()
        self._stop = asyncio.Event()
        self.background = Supervisor()
        self._stopped = False

    # -- construction ------------------------------------------------------------------

    def _local_site(self) -> LocalSite:
        config = self.config
        policy = PrivacyPolicy(
            k_min=config.node.k_min, dp=config.privacy.dp,  # type: ignore[arg-type]
            default_epsilon=config.privacy.default_epsilon, delta=config.privacy.delta,
            max_epsilon_per_query=config.privacy.max_epsilon_per_query,
            budget_epsilon=config.privacy.budget_epsilon, budget_delta=config.privacy.budget_delta,
            catalog_budget_epsilon=config.privacy.catalog_budget_epsilon, blocks=config.privacy.blocks)
        scripts = config.scripts
        runner = SandboxScripts(self.sandbox, log_policy=scripts.log_policy,
                                declared_outputs=scripts.declared_outputs,
                                concurrency=scripts.concurrency, release_slot_s=scripts.release_slot_s,
                                on_duration=self.metrics.sandbox_seconds.observe) \
            if self.sandbox is not None else None
        # [compute]: voxel maps on Dask, else from the image cache (query/sparse_images.py).
        self.images = site_images(config.compute, config.node.state_dir)
        return LocalSite(name=config.node.name, catalogs=self.catalogs, store=self.store,
                         policy=policy, noise=NoiseMechanism(),
                         overlap_guard=config.privacy.overlap_guard,
                         shared_history=config.privacy.shared_history,
                         on_decision=self.metrics.decision, script_runner=runner,
                         images=self.images,
                         storage=StorageGuard.of(self.store, config.storage))

    def _jobs(self) -> tuple[JobService, PeerSubJobs]:
        """The jobs this node is the entry of, and the sub-jobs its peers send it: under
        one script policy."""
        config = self.config
        sc = config.scripts
        scripts = ScriptPolicy(sc.policy, sc.concurrency, sc.on_restart,  # type: ignore[arg-type]
                               sc.max_pending_per_researcher)
        jobs = JobService(node=config.node.name, store=self.store, site=self.site,
                          fanout=self.fanout, verify=self.verifier, script_policy=scripts,
                          request_max_age_s=config.federation.request_max_age_s,
                          retention_days=config.node.job_retention_days,
                          max_queries_per_researcher=config.node.max_queries_per_researcher)
        subjobs = PeerSubJobs(site=self.site, store=self.store, verify=self.verifier,
                              max_age_s=config.federation.request_max_age_s, scripts=scripts,
                              max_per_entry=config.federation.max_subjobs_per_entry)
        return jobs, subjobs

    def _front(self) -> TlsFront | None:
        """The TLS front (`[tls] terminate = "stimnet"`), or None when gRPC terminates TLS."""
        m, t = self.tls.material, self.config.tls
        if t.terminate != "stimnet":
            return None
        return TlsFront(m.ca_pem, m.cert_pem, m.key_pem, handshake_timeout_s=t.handshake_timeout_s,
                        handshake_wait_s=t.handshake_wait_s, max_handshaking=t.max_handshakes,
                        max_handshaking_per_host=t.max_handshakes_per_host)

    def node_state(self) -> NodeState:
        return NodeState(config=self.config, catalogs=self.catalogs, store=self.store,
                         tls=self.tls, membership=lambda: self.membership,
                         started_at=lambda: self.started_at, grids=self.fanout.site_grids)

    @staticmethod
    def _sandbox(config: Config) -> SandboxRunner | KubeRunner:
        return script_runner(config.scripts, f"{config.scripts.image}:{SANDBOX_VERSION}",
                             node=config.node.name, state_dir=config.node.state_dir)

    async def _sandbox_startup(self) -> None:
        """Remove containers a crash left behind; say now (not at the first job) if the
        image is missing."""
        assert self.sandbox is not None
        try:
            removed = await self.sandbox.reap_orphans(await self.store.installation_id())
            if removed:
                log.warning("removed orphaned sandbox containers", count=removed)
            import docker

            if self.config.scripts.backend == "docker":
                client = await asyncio.to_thread(docker.from_env, timeout=30)
                await asyncio.to_thread(check_image, client, f"{self.config.scripts.image}:"
                                        f"{SANDBOX_VERSION}", SANDBOX_VERSION)
            if self.config.scripts.policy == "auto" and self.config.scripts.warm_containers:
                # Jobs start without waiting for review, so pre-started containers that
                # have already imported numpy/pandas (zygotes) save most of a job's
                # latency; under review the wait dwarfs it.
                for catalog in self.catalogs:
                    await self.sandbox.prewarm(catalog.root)
        except Exception as exc:  # noqa: BLE001 - scripts then fail with this reason
            log.warning("script jobs unavailable", reason=str(exc))

    def _build_server(self) -> grpc.aio.Server:
        node = self.config.node
        identities = (FrontIdentities(self.front) if self.front is not None
                      else AuthContextIdentities())
        guard = self.guard = Guard(
            identities=identities, revocations=self.revocations, audit_refusal=self.store.audit,
            audit_allowed=self.store.audit_soon, observe=self.metrics.observe_rpc,
            refusals=RefusalLimiter(burst=self.config.tls.refusals_audited_per_minute),
            admins=frozenset(self.config.node.admins), node=self.config.node.name)
        if self.front is not None:
            self.front.on_refused = guard.refuse_connection
        server = grpc.aio.server(
            interceptors=[guard],
            options=[
                # Bounds how long a connection (and so a revoked or rotated certificate on
                # it) can live; in-flight calls get the grace period to finish.
                ("grpc.max_connection_age_ms", int(node.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(node.grace_s * 1000)),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ])
        state = self.node_state()
        node_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(state), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.store), server)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs, guard), server)
        federation_pb2_grpc.add_FederationServiceServicer_to_server(
            FederationServicer(self.config.node.name, self.subjobs, guard,
                               lambda: self.membership), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    # -- lifecycle ---------------------------------------------------------------------

    def config_warnings(self, *, read_images: bool = False) -> list[str]:
        """Valid but probably unmeant settings and data (config/ and catalog/advice.py)."""
        return config_warnings(self.config) + [
            f"{self.config.source}: {w}"
            for w in catalog_warnings(self.catalogs, read_images=read_images)]

    async def start(self) -> None:
        """Lock the state dir, open the store, listen; on failure undo it (exit, not hang)."""
        try:
            await self._start()
        except BaseException:
            if self._server is not None:
                await self._server.stop(None)
            if self._inner_dir is not None:
                shutil.rmtree(self._inner_dir, ignore_errors=True)
            await self.store.close()
            raise

    async def _start(self) -> None:
        for warning in self.config_warnings():
            log.warning("config warning", problem=warning)
        for risk in privacy_risks(self.config):
            log.warning("privacy risk accepted", risk=risk)
        await self.store.open(lock_dir=True, check_identity=True)  # released by store.close()
        self._server = self._build_server()
        node = self.config.node
        port = self.port = await self._listen()
        self.advertise = node.advertise or f"{node.host}:{port}"
        interrupted = await self.jobs.recover()
        if interrupted:
            log.warning("jobs interrupted by the last stop", count=interrupted)
        await self._server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.store.audit(self.config.node.name, "node", "start", "ok",
                               {"version": __version__, "port": port})
        await self.store.keep_identity()
        self.started_at = time.time()
        self._start_background()
        log.info("listening", address=f"{node.host}:{port}", catalogs=self.catalogs.names())
        self.notifier.notify(f"READY=1\nSTATUS=serving on port {port}")

    async def _listen(self) -> int:
        node = self.config.node  # gRPC's own TLS, or the TLS front (listening.py)
        port, self._inner_dir, self.inner_socket = await listening.bind(
            self._server, self.front, self.tls.credentials, node.host, node.port, node.state_dir)
        return port

    def _start_background(self) -> None:
        """The long-lived loops, each supervised (stimnetd/supervisor.py)."""
        node, spawn = self.config.node, self.background.spawn
        if self.config.gossip.enabled:
            self._start_membership()
        if self.sandbox is not None:
            spawn("sandbox", self._sandbox_startup, restart=False)
        if self.config.metrics.listen:
            host, _, mport = self.config.metrics.listen.rpartition(":")
            self.metrics_port = self.metrics.serve(host, int(mport))
            spawn("metrics", functools.partial(self.metrics.refresh_loop,
                                               self.node_state().status))
            log.info("metrics", address=f"{host}:{self.metrics_port}")
        for name, loop in (("expiry", self._expiry_warnings), ("memtrim", memtrim.trim_loop)):
            spawn(name, loop)
        assert self.guard is not None  # built with the server
        spawn("refusals", self.guard.condense_refusals_loop)
        if node.job_retention_days:
            spawn("retention", functools.partial(self._retention, node.job_retention_days))
        if self.notifier.watchdog_s:
            spawn("watchdog", functools.partial(self._watchdog, self.notifier.watchdog_s / 2))

    async def _watchdog(self, interval: float) -> None:
        # Sent from the event loop itself, so a hung loop stops the pings and systemd
        # restarts the daemon.
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def refresh_metrics(self) -> None:
        self.metrics.update(await self.node_state().status())

    def _start_membership(self) -> None:
        cfg = self.config
        me = Member(name=cfg.node.name, address=self.advertise or "", incarnation=0,
                    status="alive", last_heard=time.time(),
                    catalogs=tuple((c.name, c.schema_version) for c in cfg.catalogs))
        transport: Any = GrpcGossipTransport(self.peer_channels)
        if self._wrap_gossip is not None:
            transport = self._wrap_gossip(transport)
        self.membership = Swim(me, list(dict.fromkeys([*cfg.federation.seeds,
                                                       *cfg.federation.peers])),
                               transport, store=StoreMembers(self.store), clock=SystemClock(),
                               rng=random.Random(), config=self.gossip_config)
        self.membership.subscribe(self._member_changed)
        # Swim.run runs once: a failure is logged, not retried.
        self.background.spawn("gossip", self.membership.run, restart=False)

    def _member_changed(self, change: MemberChange) -> None:
        """A member alive again (or moved) is dialled afresh: no stale reconnect backoff."""
        prev, now = change.previous, change.current
        if prev is not None and now.status == "alive" and (
                prev.status != "alive" or prev.address != now.address):
            self.peer_channels.redial(now.address)
            log.info("peer back", peer=now.name, was=prev.status, address=now.address)

    async def _retention(self, days: float) -> None:
        """Delete finished jobs `days` after they finished: at start, then hourly (more
        often when the retention is shorter than a few hours). Audited with the count."""
        keep_s = days * 86400
        while True:
            try:
                cutoff = time.time() - keep_s
                deleted = await self.store.prune_jobs(cutoff)
                if deleted:
                    await self.store.audit(self.config.node.name, "node", "retention", "pruned",
                                           {"jobs": deleted, "finished_before": cutoff,
                                            "job_retention_days": days})
                    log.info("finished jobs deleted", jobs=deleted, retention_days=days)
            except Exception:  # noqa: BLE001 - the next round retries; the node keeps serving
                log.exception("job retention failed")
            await asyncio.sleep(min(3600.0, max(1.0, keep_s / 4)))

    async def _expiry_warnings(self) -> None:
        # Hospital certificates expire on holidays; warn a month ahead, daily.
        while True:
            days = self.tls.days_left()
            if days < 30:
                log.warning("certificate expires soon", days_left=round(days, 1),
                            certificate=str(self.config.tls.cert),
                            action="stimctl certs renew, then SIGHUP the daemon")
            await asyncio.sleep(86400)

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        try:
            material = self.tls.reload()
        except Exception as exc:  # noqa: BLE001 - a bad reload must not take the node down
            log.error("reload failed; keeping current certificates", error=str(exc))
            return
        self.revocations.replace(material.revoked)
        if self.front is not None:
            self.front.reload(material.ca_pem, material.cert_pem, material.key_pem)
        self.verifier.forget_chains()
        # Peer channels reconnect with the new certificate (old calls finish on the old).
        self.background.spawn("peer-channels", functools.partial(self.peer_channels.reset,
                                                                 material), restart=False)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                             (signal.SIGHUP, self.reload)):
            loop.add_signal_handler(sig, handler)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop serving, give in-flight calls `grace_s`, then close everything. Every step
        runs even if an earlier one failed (each failure is logged): a step that raised
        must not leave the store, the server or their threads open, which would keep the
        process alive with its ports closed."""
        if self._stopped:
            return
        self._stopped = True
        self.notifier.notify("STOPPING=1")
        log.info("stopping", grace_s=self.config.node.grace_s)
        failed: list[BaseException] = []

        async def step(name: str, fn: Callable[[], Awaitable[object] | object]) -> None:
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # noqa: BLE001 - logged; the remaining steps still run
                log.exception("shutdown step failed", step=name)
                failed.append(exc)

        await step("health", self._health.enter_graceful_shutdown)
        if self.membership is not None:
            membership = self.membership
            # Announce `left` so peers stop probing us instead of suspecting us.
            await step("leave", lambda: asyncio.wait_for(membership.leave(), timeout=2.0))
            await step("membership", membership.shutdown)
        await step("background", self.background.shutdown)
        if self.front is not None:
            await step("front", self.front.stop_accepting)
        if self._server is not None:
            server = self._server
            # New RPCs are refused at once; in-flight ones get the grace period.
            await step("server", lambda: server.stop(self.config.node.grace_s))
        if self.front is not None:
            await step("front", self.front.close)
        if self._inner_dir is not None:
            shutil.rmtree(self._inner_dir, ignore_errors=True)
        await step("jobs", self.jobs.shutdown)
        if self.sandbox is not None:
            await step("sandbox", self.sandbox.shutdown)
        await step("compute", lambda: self.images and asyncio.to_thread(self.images.close))
        await step("peers", self.peer_channels.shutdown)
        await step("metrics", self.metrics.stop)
        if self.guard is not None:
            guard = self.guard
            await step("refusals", lambda: guard.audit_condensed_refusals(everything=True))
        await step("audit", lambda: self.store.audit(self.config.node.name, "node", "stop",
                                                     "ok", {}))
        await step("store", self.store.close)
        if failed:
            raise failed[-1]
        log.info("stopped")
