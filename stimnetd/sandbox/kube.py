"""Runs each script job as a Kubernetes Job (`[scripts] backend = "kubernetes"`).

`KubeRunner` has the `SandboxRunner` facade (run / cancel / prewarm / reap_orphans /
shutdown) so the rest of the daemon cannot tell them apart. What is created is in
`kubespec` (pure, unit-tested); how the output comes back is in `kubewrap` (in the pod)
and `kubeout` (here). The daemon polls the Job's status rather than watching it: a
watch that drops silently would leave a job unjudged, a poll cannot.

No warm pool: a pod's start is the cluster's business (image cache, scheduling), and a
zygote would need a channel into a running pod that the hardening rules out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from stimnetd.sandbox import kubespec
from stimnetd.sandbox.container import REMOVED_OUTSIDE
from stimnetd.sandbox.failure import (
    CRASHED,
    INVALID_OUTPUT,
    OUT_OF_MEMORY,
    SITE_ERROR,
    TIMED_OUT,
)
from stimnetd.sandbox.kubeout import decode_frame, frame_cap, split_frame
from stimnetd.sandbox.limits import SandboxLimits, SandboxOutcome, SandboxStatus, fmt_bytes, fmt_seconds
from stimnetd.sandbox.outputs import ResultRefused, log_lines, marker

log = structlog.get_logger("stimnetd.sandbox.kube")

POLL_FIRST_S = 0.05
POLL_MAX_S = 1.0
# Every API call has its own deadline, so a hung API server fails the job, not the daemon.
API_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 10.0
RAW: dict[str, Any] = {"_preload_content": False, "_request_timeout": API_TIMEOUT_S}


class KubeSettingsLike(Protocol):
    """`stimnetd.config.KubeSettings` (the sandbox does not import the config layer)."""

    @property
    def namespace(self) -> str: ...
    @property
    def data_claim(self) -> str: ...
    @property
    def data_root(self) -> str: ...
    @property
    def kubeconfig(self) -> str | None: ...
    @property
    def context(self) -> str | None: ...


@dataclass
class _Job:
    job_id: str
    name: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class _End:
    status: SandboxStatus
    reason: str
    result: dict[str, Any] | None = None
    arrays: dict[str, Any] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    exit_code: int | None = None
    kind: str = ""  # stimnetd.sandbox.failure.KINDS


class KubeRunner:
    """Script jobs as Kubernetes Jobs in `target.namespace`.

    `api_client` makes the `kubernetes_asyncio` ApiClient (from a kubeconfig, the pod's
    service account, or a test emulator's URL); it is called once, on first use.
    """

    def __init__(self, api_client: Callable[[], Awaitable[client.ApiClient]],
                 target: kubespec.KubeTarget, limits: SandboxLimits, *, node: str,
                 verbose_errors: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._node = kubespec.check_label_value(node, "node name")
        self._factory = api_client
        self._target = target
        self._limits = limits
        self._verbose_errors = verbose_errors
        self._clock = clock
        self._api: client.ApiClient | None = None
        self._api_lock = asyncio.Lock()
        self._jobs: dict[str, _Job] = {}
        self._closed = False
        self._installation = ""  # the store's id, from `reap_orphans` at start

    @property
    def node(self) -> str:
        return self._node

    @property
    def limits(self) -> SandboxLimits:
        return self._limits

    @property
    def out_tmpfs(self) -> bool:
        """Output always goes to a size-limited memory-backed emptyDir."""
        return True

    async def run(self, job_id: str, script: bytes, catalog_root: Path,
                  manifest: Mapping[str, Any]) -> SandboxOutcome:
        """Run `script` as a Job; never raises for job faults."""
        if self._closed:
            raise RuntimeError("sandbox runner is shut down")
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already running")
        job = _Job(job_id, f"stimnet-{secrets.token_hex(8)}")
        self._jobs[job_id] = job
        started = self._clock()
        created = False
        try:
            subpath = _subpath(Path(catalog_root), Path(self._target.data_root))
            if subpath is None:
                end = _End("failed", "the catalog is not under [scripts.kubernetes] data_root, "
                                     "so the cluster's volume cannot hold it", kind=SITE_ERROR)
                return self._outcome(end, started)
            api = await self._client()
            created = True
            try:
                await self._create(api, job, script, manifest, subpath)
            except ApiException as exc:
                return self._outcome(_End("failed", _api_reason("create the job", exc),
                                          kind=SITE_ERROR), started)
            if job.cancel.is_set():
                return self._outcome(_End("cancelled", "cancelled before start"), started)
            return self._outcome(await self._watch(api, job), started)
        finally:
            self._jobs.pop(job_id, None)
            job.done.set()
            if created:
                await self._delete_shielded(job.name)

    async def cancel(self, job_id: str) -> bool:
        """Stop a running job; its `run` returns status "cancelled". False if unknown."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel.set()
        return True

    async def prewarm(self, catalog_root: Path) -> None:
        """Nothing to do: there is no warm pool on Kubernetes (see the module docstring)."""

    async def reap_orphans(self, installation: str | None = None) -> int:
        """Delete the Jobs, ConfigMaps and NetworkPolicies this node left behind; how many
        Jobs. Objects of jobs running now (named by this runner) are kept. `installation`
        (the store's installation id) labels every object made from now on, and only
        objects carrying it are reaped: another installation with this node name in the
        namespace keeps its jobs. Without one, objects are keyed by node name only."""
        if installation is not None:
            self._installation = kubespec.check_label_value(installation, "installation id")
        api = await self._client()
        ns = self._target.namespace
        sel = kubespec.selector(self._node, self._installation)
        want = {kubespec.LABEL_MANAGED: "true", kubespec.LABEL_NODE: self._node}
        if self._installation:
            want[kubespec.LABEL_INSTALLATION] = self._installation
        names: set[str] = set()
        listings = (
            client.BatchV1Api(api).list_namespaced_job,
            client.CoreV1Api(api).list_namespaced_config_map,
            client.NetworkingV1Api(api).list_namespaced_network_policy,
        )
        for lister in listings:
            found = await _json(lister(ns, label_selector=sel, **RAW))
            for item in found.get("items", []):
                # One already being deleted (a foreground delete waits for its pod) is
                # on its way out; deleting it again would count it twice.
                if kubespec.has_labels(item, want) and not item["metadata"].get(
                        "deletionTimestamp"):
                    names.add(item["metadata"]["name"])
        own = {j.name for j in self._jobs.values()}
        for name in sorted(names - own):
            await self._delete_shielded(name)
        return len(names - own)

    async def shutdown(self) -> None:
        """Cancel running jobs (their Jobs are deleted), close the client. Idempotent."""
        self._closed = True
        for job_id in list(self._jobs):
            await self.cancel(job_id)
        waiting = [j.done.wait() for j in self._jobs.values()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiting), SHUTDOWN_GRACE_S)
        if self._api is not None:
            api, self._api = self._api, None
            await api.close()

    # -- internals ---------------------------------------------------------------------

    async def _client(self) -> client.ApiClient:
        async with self._api_lock:
            if self._api is None:
                self._api = await self._factory()
            return self._api

    async def _create(self, api: client.ApiClient, job: _Job, script: bytes,
                      manifest: Mapping[str, Any], subpath: str) -> None:
        t, name = self._target, job.name
        # The policy first: the pod must never exist without it.
        await client.NetworkingV1Api(api).create_namespaced_network_policy(
            # The client serialises plain dicts as they are (its models are not needed).
            t.namespace, cast(Any, kubespec.network_policy(name, self._node, t, self._installation)),
            _request_timeout=API_TIMEOUT_S)
        await client.CoreV1Api(api).create_namespaced_config_map(
            t.namespace, cast(Any, kubespec.job_config_map(
                name, self._node, job.job_id, t, script, json.dumps(dict(manifest), sort_keys=True),
                self._installation)),
            _request_timeout=API_TIMEOUT_S)
        await client.BatchV1Api(api).create_namespaced_job(
            t.namespace, cast(Any, kubespec.job(name, self._node, job.job_id, t, self._limits,
                                                subpath, verbose_errors=self._verbose_errors,
                                                installation=self._installation)),
            _request_timeout=API_TIMEOUT_S)

    async def _watch(self, api: client.ApiClient, job: _Job) -> _End:
        lim = self._limits
        deadline = self._clock() + lim.timeout_s
        interval = POLL_FIRST_S
        batch = client.BatchV1Api(api)
        while True:
            try:
                raw = await _json(batch.read_namespaced_job_status(job.name,
                                                                   self._target.namespace, **RAW))
            except ApiException as exc:
                if exc.status == 404:
                    return _End("failed", REMOVED_OUTSIDE, kind=SITE_ERROR)
                return _End("failed", _api_reason("read the job's status", exc), kind=SITE_ERROR)
            status = raw.get("status") or {}
            finished = _finished(status)
            if finished == "deadline":
                return _timeout(lim)
            if finished is not None:
                return await self._judge(api, job)
            if job.cancel.is_set():
                return _End("cancelled", "cancelled")
            if self._clock() >= deadline:
                return _timeout(lim)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.cancel.wait(),
                                       max(0.0, min(interval, deadline - self._clock())))
            interval = min(interval * 1.5, POLL_MAX_S)

    async def _judge(self, api: client.ApiClient, job: _Job) -> _End:
        lim, ns = self._limits, self._target.namespace
        core = client.CoreV1Api(api)
        pods = await _json(core.list_namespaced_pod(
            ns, label_selector=f"{kubespec.LABEL_POD}={job.name}", **RAW))
        mine = [p for p in pods.get("items", [])
                if kubespec.has_labels(p, {kubespec.LABEL_POD: job.name})]
        if len(mine) != 1:
            return _End("failed", "the job's pod is missing (removed outside the runner)", kind=SITE_ERROR)
        pod = mine[0]["metadata"]["name"]
        term = _terminated(mine[0])
        exit_code = term.get("exitCode")
        # The script's own log (the first log_bytes), and the frame (the last line, capped).
        text = await self._log(core, pod, limit_bytes=lim.log_bytes)
        script_log, _ = split_frame(text)
        lines = log_lines(script_log.encode(), lim.log_bytes)
        if term.get("reason") == "OOMKilled":
            return _End("failed", f"memory limit {fmt_bytes(lim.memory_bytes)} exceeded "
                                  "(OOM-killed)", log_lines=lines, exit_code=exit_code,
                        kind=OUT_OF_MEMORY)
        if exit_code != 0:
            tail = await self._log(core, pod, tail_lines=20)
            return _End("failed", _exit_reason(exit_code, tail), log_lines=lines,
                        exit_code=exit_code, kind=CRASHED)
        frame_text = await self._log(core, pod, tail_lines=1,
                                     limit_bytes=frame_cap(lim.result_bytes) + 1)
        _, body = split_frame(frame_text.rstrip("\n"))
        try:
            doc, arrays = await asyncio.to_thread(decode_frame, body, lim.result_bytes)
        except ResultRefused as exc:
            return _End("failed", str(exc), log_lines=lines, exit_code=exit_code,
                        kind=INVALID_OUTPUT)
        return _End("succeeded", "ok", doc, arrays, lines, exit_code)

    async def _log(self, core: client.CoreV1Api, pod: str, **kwargs: Any) -> str:
        try:
            text = await core.read_namespaced_pod_log(
                pod, self._target.namespace, container="job", _request_timeout=API_TIMEOUT_S,
                **kwargs)
        except ApiException:
            return ""
        return text if isinstance(text, str) else str(text)

    async def _delete(self, name: str) -> None:
        api = self._api
        if api is None:
            return
        ns = self._target.namespace
        deletions = (
            # Foreground: the pod goes with the Job, not some time later.
            lambda: client.BatchV1Api(api).delete_namespaced_job(
                name, ns, propagation_policy="Foreground", grace_period_seconds=0,
                _request_timeout=API_TIMEOUT_S),
            lambda: client.CoreV1Api(api).delete_namespaced_config_map(
                name, ns, _request_timeout=API_TIMEOUT_S),
            lambda: client.NetworkingV1Api(api).delete_namespaced_network_policy(
                name, ns, _request_timeout=API_TIMEOUT_S),
        )
        for delete in deletions:
            try:
                await delete()
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("could not delete a job object", name=name, status=exc.status)
            except (TimeoutError, OSError) as exc:
                log.warning("could not delete a job object", name=name, error=type(exc).__name__)

    async def _delete_shielded(self, name: str) -> None:
        # A cancelled job task must still delete its Job: finish even if cancelled again.
        task = asyncio.get_running_loop().create_task(self._delete(name))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            raise

    def _outcome(self, end: _End, started: float) -> SandboxOutcome:
        return SandboxOutcome(status=end.status, reason=end.reason, result=end.result,
                              arrays=end.arrays, log_lines=end.log_lines,
                              duration_s=self._clock() - started, exit_code=end.exit_code,
                              kind=end.kind)


async def _json(call: Any) -> dict[str, Any]:
    """The response's JSON as it came: the client's models validate fields client-side,
    and a field a server version leaves out must not fail a job."""
    resp = await call
    try:
        doc = await resp.json()
    finally:
        resp.release()
    return doc if isinstance(doc, dict) else {}


def _subpath(root: Path, data_root: Path) -> str | None:
    try:
        rel = root.resolve().relative_to(data_root.resolve())
    except ValueError:
        return None
    return "" if str(rel) == "." else rel.as_posix()


def _finished(status: Mapping[str, Any]) -> str | None:
    """"deadline", "done" (the pod ended, either way) or None while it runs."""
    for cond in status.get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Failed" and cond.get("reason") == "DeadlineExceeded":
            return "deadline"
        if cond.get("type") in ("Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"):
            return "done"
    if (status.get("succeeded") or 0) > 0 or (status.get("failed") or 0) > 0:
        return "done"
    return None


def _terminated(pod: Mapping[str, Any]) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        if cs.get("name") == "job":
            return dict((cs.get("state") or {}).get("terminated") or {})
    return {}


def _timeout(lim: SandboxLimits) -> _End:
    return _End("timeout", f"exceeded wall-clock limit {fmt_seconds(lim.timeout_s)} s",
                kind=TIMED_OUT)


def _exit_reason(exit_code: Any, tail: str) -> str:
    found = marker(tail.encode())
    if found:
        return f"script raised {found[0]} at line {found[1]}"
    if exit_code == 137:
        return "script was killed (SIGKILL)"
    return f"script exited with status {exit_code}"


def _api_reason(what: str, exc: ApiException) -> str:
    # The API server's message can name the namespace, quota or admission webhook; the
    # operator's log gets it, the researcher the status code.
    log.warning("kubernetes API refused", what=what, status=exc.status, reason=exc.reason)
    return f"the cluster refused to {what} (HTTP {exc.status})"


__all__ = ["KubeRunner"]


def kube_runner(settings: KubeSettingsLike, image: str, limits: SandboxLimits, *,
                node: str) -> KubeRunner:
    """The runner for `[scripts.kubernetes]`: credentials from the kubeconfig named
    there, else the pod's service account; loaded on first use, off start-up."""
    from kubernetes_asyncio import config as kube_config

    async def api() -> client.ApiClient:
        cfg = client.Configuration()
        if settings.kubeconfig:
            await kube_config.load_kube_config(config_file=settings.kubeconfig,
                                               context=settings.context,
                                               client_configuration=cfg)
        else:
            kube_config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)

    target = kubespec.KubeTarget(namespace=settings.namespace, image=image,
                                 data_claim=settings.data_claim, data_root=settings.data_root)
    return KubeRunner(api, target, limits, node=node)
