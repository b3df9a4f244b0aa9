"""Prometheus metrics, one registry per daemon (no process globals), served only if asked.

The endpoint is off unless `[metrics] listen` is set; the demo binds it to loopback.
Gauges that summarise the store (jobs by state, epsilon spent) are refreshed by a small
loop rather than at scrape time, so a scrape never waits on the database.

Names follow Prometheus' conventions, which `promtool check metrics` checks (a test runs
it): base units (seconds, timestamps in seconds since the epoch), counters end in
`_total`, and the standard `process_*` metrics and a `stimnet_build_info` are exported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from stimnet.states import JOB_STATES

# Membership states; every one is reported (0 when no peer is in it).
PEER_STATES = ("alive", "suspect", "dead", "left")


class _EpsilonSpent(Collector):
    """ε spent per catalog, a counter (it only grows) whose value the store holds: the
    durable ledger is the truth, so the exported value is read from it, not counted here."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def collect(self):  # type: ignore[no-untyped-def]
        family = CounterMetricFamily("stimnet_epsilon_spent",
                                     "Differential-privacy epsilon spent per catalog at this "
                                     "site, summed over researchers", labels=["catalog"])
        for catalog, eps in sorted(self.values.items()):
            family.add_metric([catalog], eps)
        yield family


class Metrics:
    def __init__(self, version: str = "") -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("stimnet_build_info", "Always 1; the labels name this stimnetd's version",
              ["version"], registry=r).labels(version or "unknown").set(1)
        self.rpc_total = Counter("stimnet_rpc_total", "RPCs by method and status",
                                 ["method", "status"], registry=r)
        self.rpc_latency = Histogram("stimnet_rpc_latency_seconds", "RPC latency by method",
                                     ["method"], registry=r,
                                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                              2.5, 5, 10, 30))
        self.jobs = Gauge("stimnet_jobs", "Jobs by state", ["state"], registry=r)
        self.queue_depth = Gauge("stimnet_queue_depth", "Jobs queued or awaiting approval",
                                 registry=r)
        self.sandbox_seconds = Histogram("stimnet_sandbox_run_seconds", "Sandbox run time",
                                         registry=r, buckets=(.25, .5, 1, 2, 5, 10, 30, 60, 120,
                                                              300))
        self.peers = Gauge("stimnet_peers", "Other federation members known to this node, by "
                           "membership status (the node itself is not counted)", ["status"],
                           registry=r)
        self.privacy_decisions = Counter("stimnet_privacy_decisions_total",
                                         "Privacy decisions by kind", ["decision"], registry=r)
        self.epsilon_spent = _EpsilonSpent()
        r.register(self.epsilon_spent)
        self.cert_expiry = Gauge("stimnet_certificate_expiry_timestamp_seconds",
                                 "When this node's certificate expires (Unix time)", registry=r)
        self._server: Any = None
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe_rpc(self, method: str, status: str, seconds: float) -> None:
        # labels() resolves the child under a lock on every call; the set of (method,
        # status) pairs is small and fixed, so keep the children.
        children = self._rpc_children.get((method, status))
        if children is None:
            children = (self.rpc_total.labels(method, status), self.rpc_latency.labels(method))
            self._rpc_children[(method, status)] = children
        children[0].inc()
        if seconds > 0:
            children[1].observe(seconds)

    def decision(self, kind: str) -> None:
        self.privacy_decisions.labels(kind).inc()

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def update(self, s: dict[str, Any]) -> None:
        # Every state, zeros included: a state no job is in any more must read 0, not
        # keep the last count it had.
        for state in JOB_STATES:
            self.jobs.labels(state).set(s["jobs_by_state"].get(state, 0))
        self.queue_depth.set(s["queue_depth"])
        self.peers.clear()
        for status in sorted({*PEER_STATES, *s["peers_by_status"]}):
            self.peers.labels(status).set(s["peers_by_status"].get(status, 0))
        self.epsilon_spent.values = dict(s["epsilon_spent"])
        self.cert_expiry.set(s["cert_expires_at"])

    async def refresh_loop(self, snapshot: Callable[[], Awaitable[dict[str, Any]]],
                           interval_s: float = 2.0) -> None:
        """Refresh the store's gauges every `interval_s`. A failed refresh raises: the
        daemon's supervisor logs it and starts the loop again."""
        while True:
            self.update(await snapshot())
            await asyncio.sleep(interval_s)
