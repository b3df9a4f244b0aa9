"""The script-job runner `[scripts] backend` names: the local Docker engine (default) or
Kubernetes. Both have the same facade (run / cancel / prewarm / reap_orphans / shutdown)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stimnetd.config.policy import ScriptSettings
from stimnetd.sandbox.limits import SandboxLimits
from stimnetd.sandbox.runner import SandboxRunner

if TYPE_CHECKING:
    from stimnetd.sandbox.kube import KubeRunner


def script_runner(sc: ScriptSettings, image: str, *, node: str,
                  state_dir: Path) -> SandboxRunner | KubeRunner:
    import docker

    limits = SandboxLimits(memory_bytes=sc.memory_mb * 2**20, pids=sc.pids, cpus=sc.cpus,
                           timeout_s=sc.timeout_s, result_bytes=sc.result_mb * 2**20)
    if sc.backend == "kubernetes":
        # Imported here: kubernetes_asyncio's models take ~0.6 s to import.
        from stimnetd.sandbox.kube import kube_runner

        assert sc.kubernetes is not None
        return kube_runner(sc.kubernetes, image, limits, node=node)
    # The client is made lazily, off the loop, on first use: a node that never runs a
    # script never needs the Docker socket.
    return SandboxRunner(lambda: docker.from_env(timeout=60).api, image, limits, state_dir,
                         node=node, warm_per_catalog=max(sc.warm_containers, 1))
