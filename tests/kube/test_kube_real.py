"""The Kubernetes backend against a real cluster, when one is named.

Set STIMNET_KUBE_TEST_KUBECONFIG (a kubeconfig file), STIMNET_KUBE_TEST_NAMESPACE,
STIMNET_KUBE_TEST_CLAIM (a PVC whose root holds ``cat1/subjects.csv`` with a ``subject``
column) and STIMNET_KUBE_TEST_DATA_ROOT (the host directory that claim mirrors; a
directory ``cat1`` must exist under it here too). The sandbox image must be pullable by
the cluster as ``stimnet-sandbox:<version>`` (or STIMNET_KUBE_TEST_IMAGE). Without these
variables the test is skipped: no cluster can run on the development machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stimnetd.config.policy import KubeSettings
from stimnetd.sandbox import SANDBOX_VERSION, SandboxLimits
from stimnetd.sandbox.kube import kube_runner
from tests.kube.test_kube_contract import COUNT, MANIFEST

ENV = ("STIMNET_KUBE_TEST_KUBECONFIG", "STIMNET_KUBE_TEST_NAMESPACE", "STIMNET_KUBE_TEST_CLAIM",
       "STIMNET_KUBE_TEST_DATA_ROOT")


@pytest.mark.skipif(not all(os.environ.get(k) for k in ENV),
                    reason=f"no real cluster named ({', '.join(ENV)})")
async def test_a_script_job_runs_on_a_real_cluster_and_leaves_nothing() -> None:
    """The count script runs as a Job on the named cluster; its result comes back and its
    objects are gone after (reap_orphans finds none)."""
    settings = KubeSettings(namespace=os.environ["STIMNET_KUBE_TEST_NAMESPACE"],
                            data_claim=os.environ["STIMNET_KUBE_TEST_CLAIM"],
                            data_root=os.environ["STIMNET_KUBE_TEST_DATA_ROOT"],
                            kubeconfig=os.environ["STIMNET_KUBE_TEST_KUBECONFIG"])
    image = os.environ.get("STIMNET_KUBE_TEST_IMAGE", f"stimnet-sandbox:{SANDBOX_VERSION}")
    runner = kube_runner(settings, image, SandboxLimits(timeout_s=300.0), node="kube-test")
    try:
        outcome = await runner.run("real-1", COUNT, Path(settings.data_root) / "cat1", MANIFEST)
        assert outcome.status == "succeeded", outcome.reason
        assert outcome.result is not None and outcome.result["aggregates"][0]["name"] == "n"
        assert await runner.reap_orphans() == 0
    finally:
        await runner.shutdown()
