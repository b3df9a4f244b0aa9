"""A test stand-in for the Job controller and the kubelet, on kmock's Kubernetes emulator.

kmock's `KubernetesEmulator` is an in-memory API server over real HTTP on 127.0.0.1: it
stores what is created, serves reads, lists and deletes. It runs nothing. `TestKubelet`
does the part of a cluster the runner depends on, in the simplest honest way:

- it sees each new Job, records whether its NetworkPolicy already existed (the runner
  must create the policy first), and creates one Pod with the template's labels;
- it runs the pod's own command (`python3 -I -B -c <kubewrap.py>`) as a host process,
  with the ConfigMap's files written to a temp /job and STIMNET_OUT/STIMNET_JOB/
  STIMNET_DATA and the entrypoint path pointed at host paths. There is no container,
  no seccomp, no cgroup: what this checks is the API contract and the output channel,
  not the isolation (which a real cluster enforces from the spec the unit tests pin);
- the Pod's log endpoint serves the process's combined stdout/stderr with the kubelet's
  tailLines/limitBytes semantics; the Job's status gets `succeeded`/`failed` and a
  Complete/Failed condition, the Pod its container's terminated state;
- deleting the Job kills the process (like a pod's deletion), and `oom` makes the next
  pod end as the kubelet reports an OOM kill.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "sandbox" / "runtime" / "entrypoint.py"
JOBS = kmock.resource("batch", "v1", "jobs")
PODS = kmock.resource("", "v1", "pods")
POLICIES = kmock.resource("networking.k8s.io", "v1", "networkpolicies")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")


@dataclass
class PodRun:
    name: str
    namespace: str
    job: str
    policy_existed: bool
    log: bytes = b""
    exit_code: int | None = None
    process: asyncio.subprocess.Process | None = None
    killed: bool = False


@dataclass
class TestKubelet:
    emulator: kmock.KubernetesEmulator
    data_dir: Path
    oom: bool = False
    runs: dict[str, PodRun] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _tmp: tempfile.TemporaryDirectory[str] = field(
        default_factory=lambda: tempfile.TemporaryDirectory(prefix="kubelet-"))

    async def run(self) -> None:
        while True:
            for (res, ns, name), obj in list(self.emulator.objects.items()):
                # A Job without a spec stands for one a dead daemon left finished.
                if (res == JOBS and not obj.deleted and name not in self.runs
                        and "spec" in obj.raw):
                    self._start(ns, name, obj.raw)
                if res == JOBS and obj.deleted and name in self.runs:
                    await self._kill(self.runs[name])
            await asyncio.sleep(0.02)

    def live(self, resource: kmock.resource) -> list[str]:
        return sorted(n for (r, _, n), o in self.emulator.objects.items()
                      if r == resource and not o.deleted)

    async def settled(self) -> None:
        """Wait (up to 10 s) until every Job was deleted, its process ended, its pod gone."""
        for _ in range(500):
            if all(r.killed and r.process is not None and r.process.returncode is not None
                   for r in self.runs.values()):
                return
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        for run in self.runs.values():
            _kill_group(run)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tmp.cleanup()

    def _start(self, ns: str, name: str, job: dict[str, Any]) -> None:
        existed = any(r == POLICIES and n == name and not o.deleted
                      for (r, _, n), o in self.emulator.objects.items())
        pod = f"{name}-x7k2q"
        run = self.runs[name] = PodRun(pod, ns, name, existed)
        labels = dict(job["spec"]["template"]["metadata"]["labels"])
        self.emulator.objects[(PODS, ns, pod)] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns, "labels": {**labels, "job-name": name}},
            "status": {"phase": "Running"},
        }
        self.emulator[f"get /api/v1/namespaces/{ns}/pods/{pod}/log"] << (
            lambda req: _log_slice(run.log, req.params))
        task = asyncio.get_running_loop().create_task(self._execute(ns, name, job, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, ns: str, name: str, job: dict[str, Any], run: PodRun) -> None:
        spec = job["spec"]["template"]["spec"]
        container = spec["containers"][0]
        cm = self.emulator.objects[(CONFIGMAPS, ns, name)].raw
        root = Path(self._tmp.name) / name
        (root / "job").mkdir(parents=True)
        (root / "out").mkdir()
        (root / "job" / "script.py").write_bytes(base64.b64decode(cm["binaryData"]["script.py"]))
        (root / "job" / "manifest.json").write_text(cm["data"]["manifest.json"])
        env = {e["name"]: e["value"] for e in container["env"]}
        env.update(STIMNET_ENTRYPOINT=f"{sys.executable} -I -B {ENTRYPOINT}",
                   STIMNET_SCRIPT=str(root / "job" / "script.py"), STIMNET_OUT=str(root / "out"),
                   STIMNET_JOB=str(root / "job"), STIMNET_DATA=str(self.data_dir),
                   PATH=os.environ.get("PATH", "/usr/bin:/bin"))
        argv = [sys.executable, *container["command"][1:]]
        run.process = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=root / "job", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        out, _ = await run.process.communicate()
        run.log, run.exit_code = out, run.process.returncode
        if run.killed:
            return
        code = 137 if self.oom else run.exit_code
        terminated = {"exitCode": code, "reason": "OOMKilled" if self.oom else
                      ("Completed" if code == 0 else "Error")}
        pod = self.emulator.objects[(PODS, ns, run.name)]
        pod.patch({"status": {"phase": "Succeeded" if code == 0 else "Failed",
                              "containerStatuses": [{
                                  "name": "job", "image": container["image"], "imageID": "",
                                  "ready": False, "restartCount": 0,
                                  "state": {"terminated": terminated}}]}})
        kind = "Complete" if code == 0 else "Failed"
        with contextlib.suppress(Exception):
            self.emulator.objects[(JOBS, ns, name)].patch({"status": {
                "succeeded" if code == 0 else "failed": 1,
                "conditions": [{"type": kind, "status": "True"}]}})

    async def _kill(self, run: PodRun) -> None:
        if run.killed:
            return
        run.killed = True
        _kill_group(run)
        # The Job's deletion takes its pod with it (the runner deletes in the foreground).
        pod = self.emulator.objects[(PODS, run.namespace, run.name)]
        if not pod.deleted:
            pod.delete()


def _kill_group(run: PodRun) -> None:
    # A pod's processes all die with it; the wrapper's child (the entrypoint) too.
    if run.process is not None and run.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, signal.SIGKILL)


def _log_slice(log: bytes, params: Any) -> bytes:
    """What the kubelet answers for ?tailLines=&limitBytes= (tail first, then the cap)."""
    data = log
    if "tailLines" in params:
        n = int(params["tailLines"])
        data = b"".join(data.splitlines(keepends=True)[-n:]) if n else b""
    if "limitBytes" in params:
        data = data[: int(params["limitBytes"])]
    return data
