"""Fixtures for the Kubernetes backend's contract tests: kmock's in-process API emulator
on 127.0.0.1, the test kubelet (tests/kube/kubelet.py) and a KubeRunner pointed at them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest
from kubernetes_asyncio import client

from stimnetd.sandbox import SandboxLimits
from stimnetd.sandbox.kube import KubeRunner
from stimnetd.sandbox.kubespec import KubeTarget
from tests.kube.kubelet import TestKubelet

LIMITS = SandboxLimits(timeout_s=20.0, result_bytes=64 * 1024, log_bytes=16 * 1024)
NAMESPACE = "stimnet-jobs"


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "catalogs"
    (root / "cat1").mkdir(parents=True)
    (root / "cat1" / "subjects.csv").write_text("subject,age\ns1,50\ns2,60\ns3,70\n")
    return root


@pytest.fixture
async def cluster(data_root: Path) -> AsyncIterator[tuple[kmock.KubernetesEmulator, TestKubelet]]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        kubelet = TestKubelet(emulator, data_root / "cat1")
        task = asyncio.get_running_loop().create_task(kubelet.run())
        try:
            yield emulator, kubelet
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await kubelet.close()


def make_runner(emulator: kmock.KubernetesEmulator, data_root: Path,
                limits: SandboxLimits = LIMITS, node: str = "site-a") -> KubeRunner:
    async def api() -> client.ApiClient:
        return client.ApiClient(client.Configuration(host=str(emulator.url).rstrip("/")))

    target = KubeTarget(namespace=NAMESPACE, image="stimnet-sandbox:0.1.0",
                        data_claim="stimnet-catalogs", data_root=str(data_root))
    return KubeRunner(api, target, limits, node=node)
