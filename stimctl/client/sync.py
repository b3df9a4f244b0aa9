"""`Client`: the blocking client for scripts and notebooks.

It runs an `AsyncClient` on an event loop of its own, on a background thread, so it also
works inside Jupyter, whose loop is already running. Each method is the `AsyncClient`
method of the same name, waited for; streams come back as lists.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from stimctl.client.aio import AsyncClient
from stimctl.client.config import ClientConfig
from stimctl.client.events import Event, OnEvent
from stimctl.results import QueryAnswer
from stimnet import signing
from stimnet.v1 import admin_pb2, jobs_pb2, node_pb2

T = TypeVar("T")


class Client:
    """A node's services, each call waited for.

    Args:
        config: a `ClientConfig`, or the path of a client TOML file (by default
            ``~/.config/stimnet/client.toml``).

    Raises:
        ConfigProblem: the config file or the files it names cannot be read.
    """

    def __init__(self, config: ClientConfig | Path | str | None = None) -> None:
        cfg = config if isinstance(config, ClientConfig) else ClientConfig.load(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="stimctl-client")
        self._thread.start()
        # Made on the loop's thread: its channel belongs to that loop.
        self._async = self._run(_make_async(cfg))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def config(self) -> ClientConfig:
        """The node's address and the caller's files this client uses."""
        return self._async.config

    @property
    def address(self) -> str:
        """The node's ``host:port``."""
        return self._async.address

    def close(self) -> None:
        """End the Session stream and the channel, then this client's loop and thread."""
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- node ------------------------------------------------------------------------

    def info(self) -> node_pb2.NodeInfo:
        """Who the node is, who it sees calling, and its policies (k_min, DP, scripts)."""
        return self._run(self._async.info())

    def entry_node(self) -> str:
        """The name of the node this client talks to, which every job it signs names."""
        return self._run(self._async.entry_node())

    def catalogs(self, *, federated: bool = False) -> list[node_pb2.CatalogSummary]:
        """The catalogs this node holds, or every member's.

        Args:
            federated: include the catalogs of every member the node knows of.
        """
        return self._run(self._async.catalogs(federated=federated))

    def describe(self, name: str, *, federated: bool = True) -> node_pb2.CatalogDescription:
        """A catalog's tables, fields (types, units, bounds, levels), images and ROIs, and
        each site's image grid (`grids`: declared or taken from its images).

        Args:
            name: the catalog, e.g. ``"dbs_outcomes"``.
            federated: ask every peer holding the catalog for its grid too (the entry
                asks each under a 5 s deadline); False: this node's grid only.
        """
        return self._run(self._async.describe(name, federated=federated))

    def peers(self) -> list[node_pb2.Peer]:
        """The federation's members as this node's membership sees them."""
        return self._run(self._async.peers())

    def status(self) -> node_pb2.NodeStatus:
        """The node's summary: uptime, peers, jobs by state, budget spent (admins)."""
        return self._run(self._async.status())

    # -- admin -----------------------------------------------------------------------

    def audit_verify(self) -> admin_pb2.VerifyAuditResponse:
        """Check the audit log's hash chain; the first broken entry if any (admins)."""
        return self._run(self._async.audit_verify())

    def audit_export(self, since: float = 0.0) -> list[admin_pb2.AuditEntry]:
        """The audit log's entries, oldest first (admins).

        Args:
            since: only entries written at or after this unix time.
        """
        return self._run(_collect(self._async.audit_export(since)))

    # -- jobs ----------------------------------------------------------------------------

    def sign(self, request: signing.JobRequest, script: bytes | None = None) -> signing.SignedJob:
        """Sign a job request with the caller's key, as the files are now.

        Args:
            request: the job (`stimnet.signing.new_request`).
            script: a script job's source, whose SHA-256 the request carries.
        """
        return self._async.sign(request, script)

    def submit(self, signed: signing.SignedJob) -> jobs_pb2.Job:
        """Submit a signed job; the job as the node recorded it.

        Args:
            signed: the job, signed (`sign`).
        """
        return self._run(self._async.submit(signed))

    def submit_query(self, query: str | dict[str, Any], *, federated: bool = False,
                     epsilon: float | None = None, min_sites: int = 1) -> jobs_pb2.Job:
        """Sign a query job and submit it, without waiting for its answer.

        Args:
            query: restricted SQL, or a spec dict.
            federated: fan out to every site holding the catalog.
            epsilon: request differential privacy with this ε.
            min_sites: the job fails unless this many sites contribute.
        """
        return self._run(self._async.submit_query(query, federated=federated, epsilon=epsilon,
                                                  min_sites=min_sites))

    def submit_script(self, script: bytes, catalog: str, *, federated: bool = False,
                      epsilon: float | None = None, min_sites: int = 1,
                      outputs: str | dict[str, Any] | None = None) -> jobs_pb2.Job:
        """Sign a script job and submit it (see `AsyncClient.submit_script`).

        Args:
            script: the Python source run in each site's sandbox.
            catalog: the catalog it runs on.
            federated: run it at every site holding the catalog.
            epsilon: request differential privacy with this ε.
            min_sites: the job fails unless this many sites contribute.
            outputs: what the script emits, as SQL or a spec, signed with it.
        """
        return self._run(self._async.submit_script(
            script, catalog, federated=federated, epsilon=epsilon, min_sites=min_sites,
            outputs=outputs))

    def watch(self, job_id: str, timeout: float | None = None, *,
              follow_restarts: bool = True) -> list[Event]:
        """A job's events, once it has ended: ("state", Job), ("site", SiteEvent),
        ("log", str), ("result", QueryAnswer), and ("reconnecting", reason) if the node
        went away meanwhile (the watch follows the job across a restart of the node).

        Args:
            job_id: the job.
            timeout: the deadline of the whole watch; by default 20 × the config's
                `timeout_s`.
            follow_restarts: False: end (or raise) when the node's stream does.
        """
        return self._run(_collect(self._async.watch(job_id, timeout,
                                                    follow_restarts=follow_restarts)))

    def result(self, job_id: str) -> QueryAnswer:
        """A finished job's stored answer (its owner's, or an admin's).

        Args:
            job_id: the job.
        """
        return self._run(self._async.result(job_id))

    def run_job(self, job: jobs_pb2.Job, on_event: OnEvent | None = None) -> QueryAnswer:
        """Watch a submitted job to its end: the answer, or a typed error saying why not.

        Args:
            job: the job as `submit` returned it.
            on_event: called with each ``(kind, value)`` event as it arrives (on this
                client's thread).
        """
        return self._run(self._async.run_job(job, on_event))

    def query(self, query: str | dict[str, Any], *, federated: bool = False,
              epsilon: float | None = None, min_sites: int = 1,
              on_event: OnEvent | None = None) -> QueryAnswer:
        """Run an aggregate query and return its combined answer.

        Args:
            query: restricted SQL, e.g. ``"SELECT count(*) FROM dbs_outcomes"``, or a spec.
            federated: fan out to every site holding the catalog.
            epsilon: request differential privacy with this ε.
            min_sites: fail unless this many sites contribute.
            on_event: called with each ``(kind, value)`` event as it arrives (on this
                client's thread).

        Raises:
            InvalidRequest: the query or its options are refused before sending.
            JobFailed: fewer than `min_sites` sites contributed (the message names why).
        """
        return self._run(self._async.query(query, federated=federated, epsilon=epsilon,
                                           min_sites=min_sites, on_event=on_event))

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        """One job: its state, detail and per-site states.

        Args:
            job_id: the job.
        """
        return self._run(self._async.get_job(job_id))

    def list_jobs(self, limit: int = 50) -> list[jobs_pb2.Job]:
        """The caller's jobs (an admin's: everyone's), newest first.

        Args:
            limit: at most this many.
        """
        return self._run(self._async.list_jobs(limit))

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        """Cancel a job that has not ended.

        Args:
            job_id: the job.
        """
        return self._run(self._async.cancel(job_id))

    def approve(self, job_id: str, remember: bool = False) -> jobs_pb2.Job:
        """Approve a script job awaiting review (admins).

        Args:
            job_id: the job.
            remember: approve the script (by SHA-256) for future jobs too.
        """
        return self._run(self._async.approve(job_id, remember))

    def deny(self, job_id: str) -> jobs_pb2.Job:
        """Deny a script job awaiting review (admins).

        Args:
            job_id: the job.
        """
        return self._run(self._async.deny(job_id))


async def _make_async(cfg: ClientConfig) -> AsyncClient:
    return AsyncClient(cfg)


async def _collect(it: AsyncIterator[T]) -> list[T]:
    return [x async for x in it]
