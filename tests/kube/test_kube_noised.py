"""A site whose scripts run on Kubernetes refuses a noised (sample-and-aggregate) script
job when it is submitted, saying why, and creates nothing in the cluster: its backend
mounts the catalog's volume as it is, so no block could be kept to its own subjects. A
daemon in-process, its [scripts.kubernetes] kubeconfig pointing at kmock's emulator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stimctl.client import AsyncClient, Refused
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.testing import CertFactory, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config
from tests.kube.conftest import NAMESPACE
from tests.kube.kubelet import CONFIGMAPS, JOBS, PODS, POLICIES

MEAN = b"from stimnet_runtime import load_table, emit_mean\n" \
       b"df = load_table('s')\nemit_mean('m', 'age', df['age'])\n"
OUT = "SELECT clamp(avg(age), 0, 100) AS m FROM tiny"


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: emu, cluster: {{server: "{server}"}}}}]
users: [{{name: emu, user: {{}}}}]
contexts: [{{name: emu, context: {{cluster: emu, user: emu}}}}]
current-context: emu
""")
    return path


@pytest.mark.parametrize("dp", ["required", "optional"])
async def test_a_noised_script_job_is_refused_on_kubernetes_before_anything_is_made(
        cluster, data_root: Path, tmp_path: Path, pki: CertFactory, dp: str) -> None:
    """dp required (every script job noised) and dp optional with an ε: the submit is
    refused naming the backend and what would work; no Job, ConfigMap, NetworkPolicy or
    pod ever existed in the cluster."""
    # Prepare
    emulator, _ = cluster
    name, port = f"sbx-kube-{dp}-{os.getpid()}", free_port()
    cat = _tiny_catalog(data_root / "tiny", [float(20 + i) for i in range(30)])
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", str(emulator.url).rstrip("/"))
    cfg = write_node_config(tmp_path / "node", pki.issue(name, "node"), name, port=port,
                            catalogs=[cat], crl=pki.crl_path, gossip={"enabled": False},
                            scripts={"policy": "auto", "backend": "kubernetes",
                                     "kubernetes": {"namespace": NAMESPACE,
                                                    "data_claim": "stimnet-catalogs",
                                                    "data_root": str(data_root),
                                                    "kubeconfig": str(kubeconfig)}},
                            privacy={"dp": dp})
    daemon = Daemon(load_config(cfg))
    await daemon.start()
    alice = pki.issue("alice", "researcher")
    try:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{port}", 60)) as c:
            # Execute
            with pytest.raises(Refused) as refused:
                await c.submit_script(MEAN, "tiny", outputs=OUT, epsilon=1.0)
    finally:
        await daemon.shutdown()
    # Assert
    message = refused.value.args[0]
    assert "runs scripts on Kubernetes ([scripts] backend)" in message
    assert "cannot run a script under differential privacy" in message
    assert 'backend = "docker"' in message
    made = [(r, n) for (r, _, n) in emulator.objects if r in (JOBS, CONFIGMAPS, POLICIES, PODS)]
    assert made == []
