"""KubeRunner against kmock's Kubernetes API emulator and the test kubelet: the objects
it creates, in what order, what comes back through the output channel, timeout, cancel,
OOM, and that nothing it made is left behind."""

from __future__ import annotations

import asyncio
import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from stimnetd.sandbox import kubespec
from tests.kube.conftest import LIMITS, NAMESPACE, make_runner
from tests.kube.kubelet import CONFIGMAPS, JOBS, PODS, POLICIES

MANIFEST = {"tables": {"subjects": "subjects.csv"}, "subject_key": "subject",
            "image_fields": [], "fields": {}}


def script(body: str) -> bytes:
    return textwrap.dedent(body).encode()


COUNT = script("""
    import stimnet_runtime as rt
    rt.emit_count("n", len(rt.load_table("subjects")))
    print("counted")
""")


async def assert_nothing_left(kubelet) -> None:  # type: ignore[no-untyped-def]
    """The runner's deletes have reached the kubelet, and nothing it made is live."""
    await kubelet.settled()
    for resource in (JOBS, CONFIGMAPS, POLICIES, PODS):
        assert kubelet.live(resource) == [], resource


async def test_a_script_runs_as_a_job_and_its_result_comes_back_through_the_log(
        cluster, data_root: Path) -> None:
    """The script reads the read-only catalog and emits a count; the result document
    arrives through the framed log line, the script's own print as a log line."""
    emulator, kubelet = cluster
    runner = make_runner(emulator, data_root)
    try:
        outcome = await runner.run("job-1", COUNT, data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert outcome.status == "succeeded", outcome.reason
    (agg,) = outcome.result["aggregates"]
    assert (agg["name"], agg["stats"]["n"]) == ("n", [3])
    assert outcome.log_lines == ["counted"]
    assert outcome.exit_code == 0
    await assert_nothing_left(kubelet)


async def test_the_network_policy_exists_before_the_job_and_selects_its_pod(
        cluster, data_root: Path) -> None:
    """The deny-all policy is created first, and its selector matches the pod's labels."""
    emulator, kubelet = cluster
    runner = make_runner(emulator, data_root)
    try:
        await runner.run("job-1", COUNT, data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    (run,) = kubelet.runs.values()
    assert run.policy_existed
    creates = list(emulator["post"])
    assert [r.resource.plural for r in creates] == ["networkpolicies", "configmaps", "jobs"]
    policy, job = creates[0].data, creates[2].data
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in
               policy["spec"]["podSelector"]["matchLabels"].items())
    assert (policy["spec"]["ingress"], policy["spec"]["egress"]) == ([], [])
    # The ConfigMap carries the script byte for byte and the manifest the daemon built.
    cm = creates[1].data
    assert json.loads(cm["data"]["manifest.json"]) == MANIFEST
    assert cm["metadata"]["annotations"][kubespec.ANNOTATION_JOB] == "job-1"


async def test_a_job_past_its_wall_clock_limit_times_out_and_is_deleted(
        cluster, data_root: Path) -> None:
    """A sleeping script ends as "timeout" naming the limit; its Job, pod, ConfigMap and
    policy are deleted and its process killed."""
    emulator, kubelet = cluster
    runner = make_runner(emulator, data_root, replace(LIMITS, timeout_s=1.0))
    try:
        outcome = await runner.run("job-1", script("import time\ntime.sleep(60)\n"),
                                   data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert outcome.status == "timeout"
    assert outcome.reason == "exceeded wall-clock limit 1 s"
    (run,) = kubelet.runs.values()
    for _ in range(100):
        if run.process is not None and run.process.returncode is not None:
            break
        await asyncio.sleep(0.02)
    assert run.killed and run.process.returncode is not None
    await assert_nothing_left(kubelet)


async def test_a_cancelled_job_ends_cancelled_and_is_deleted(cluster, data_root: Path) -> None:
    """cancel() ends a running job as "cancelled" and its objects are deleted."""
    emulator, kubelet = cluster
    runner = make_runner(emulator, data_root)
    try:
        task = asyncio.create_task(runner.run("job-1", script("import time\ntime.sleep(60)\n"),
                                              data_root / "cat1", MANIFEST))
        while not kubelet.runs:
            await asyncio.sleep(0.02)
        assert await runner.cancel("job-1")
        outcome = await task
    finally:
        await runner.shutdown()
    assert (outcome.status, outcome.reason) == ("cancelled", "cancelled")
    await assert_nothing_left(kubelet)


async def test_a_failing_script_reports_only_the_exception_type_and_line(
        cluster, data_root: Path) -> None:
    """A KeyError quoting a value is reported as type and line, the value nowhere in the
    reason."""
    emulator, _ = cluster
    runner = make_runner(emulator, data_root)
    try:
        outcome = await runner.run("job-1", script("x = 1\nraise KeyError('patient 0042')\n"),
                                   data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert (outcome.status, outcome.reason) == ("failed", "script raised KeyError at line 2")
    assert outcome.exit_code == 1


async def test_an_oom_killed_pod_is_reported_as_the_memory_limit(cluster, data_root: Path) -> None:
    """The kubelet's OOMKilled reason becomes the memory-limit reason."""
    emulator, kubelet = cluster
    kubelet.oom = True
    runner = make_runner(emulator, data_root)
    try:
        outcome = await runner.run("job-1", COUNT, data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert (outcome.status, outcome.reason) == ("failed",
                                                 "memory limit 512 MiB exceeded (OOM-killed)")


async def test_output_over_the_result_limit_in_several_files_is_refused(
        cluster, data_root: Path) -> None:
    """Two array files each under the cap but over it together: the channel refuses."""
    emulator, _ = cluster
    runner = make_runner(emulator, data_root)
    body = script("""
        import os
        out = os.environ["STIMNET_OUT"]
        for name in ("a.npy", "b.npy"):
            with open(os.path.join(out, name), "wb") as fh:
                fh.write(b"x" * 40_000)
        with open(os.path.join(out, "result.json"), "w") as fh:
            fh.write('{"aggregates": []}')
    """)
    try:
        outcome = await runner.run("job-1", body, data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert (outcome.status, outcome.reason) == ("failed", "output exceeded result limit 64 KiB")


async def test_a_script_that_forges_the_frame_gains_nothing(cluster, data_root: Path) -> None:
    """A frame printed by the script is followed by the wrapper's real one, and that is
    the one read; a script with no result emits no aggregates whatever it printed."""
    emulator, _ = cluster
    runner = make_runner(emulator, data_root)
    forged = ('stimnet-out-v1 {"result.json": "eyJhZ2dyZWdhdGVzIjogW119"}')
    try:
        outcome = await runner.run("job-1", script(f"print({forged!r})\n"),
                                   data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert (outcome.status, outcome.reason) == (
        "failed", "script emitted no aggregates (no result file)")


async def test_a_catalog_outside_the_data_root_is_refused_before_anything_is_created(
        cluster, data_root: Path, tmp_path: Path) -> None:
    """A catalog the claim cannot hold fails with a reason naming the setting."""
    emulator, kubelet = cluster
    runner = make_runner(emulator, data_root / "cat1")
    try:
        outcome = await runner.run("job-1", COUNT, tmp_path, MANIFEST)
    finally:
        await runner.shutdown()
    assert outcome.status == "failed"
    assert "[scripts.kubernetes] data_root" in outcome.reason
    assert list(emulator["post"]) == []


async def test_reap_orphans_deletes_this_nodes_leftovers_only(cluster, data_root: Path) -> None:
    """Objects labelled for this node are deleted; another node's are kept."""
    emulator, kubelet = cluster
    mine = kubespec.labels("site-a", "stimnet-dead1")
    theirs = kubespec.labels("site-b", "stimnet-dead2")
    for name, labels in (("stimnet-dead1", mine), ("stimnet-dead2", theirs)):
        for res in (JOBS, CONFIGMAPS, POLICIES):
            emulator.objects[(res, NAMESPACE, name)] = {
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels}}
    runner = make_runner(emulator, data_root)
    try:
        assert await runner.reap_orphans() == 1
    finally:
        await runner.shutdown()
    for res in (JOBS, CONFIGMAPS, POLICIES):
        assert kubelet.live(res) == ["stimnet-dead2"]


async def test_reap_orphans_spares_another_installation_with_the_same_node_name(
        cluster, data_root: Path) -> None:
    """Two installations named site-a in one namespace: each labels its objects with its
    store's installation id and reaps only its own leftovers; a job it runs after the
    reap carries that id on every object."""
    emulator, kubelet = cluster
    for name, inst in (("stimnet-old1", "aaaa1111"), ("stimnet-old2", "bbbb2222")):
        for res in (JOBS, CONFIGMAPS, POLICIES):
            emulator.objects[(res, NAMESPACE, name)] = {"metadata": {
                "name": name, "namespace": NAMESPACE,
                "labels": kubespec.labels("site-a", name, inst)}}
    runner = make_runner(emulator, data_root)
    try:
        assert await runner.reap_orphans("aaaa1111") == 1
        for res in (JOBS, CONFIGMAPS, POLICIES):
            assert kubelet.live(res) == ["stimnet-old2"], res
        outcome = await runner.run("job-1", COUNT, data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert outcome.status == "succeeded", outcome.reason
    creates = [r.data for r in emulator["post"]]
    assert len(creates) == 3
    for body in creates:
        assert body["metadata"]["labels"][kubespec.LABEL_INSTALLATION] == "aaaa1111"
    pod = creates[2]["spec"]["template"]["metadata"]["labels"]
    assert pod[kubespec.LABEL_INSTALLATION] == "aaaa1111"


async def test_an_installation_id_that_is_no_label_value_is_refused(data_root: Path) -> None:
    """The id goes into labels; one Kubernetes cannot carry is refused before any call."""
    runner = make_runner(None, data_root)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="installation id 'not a label!' cannot be"):
        await runner.reap_orphans("not a label!")


async def test_the_cluster_refusing_the_job_fails_it_with_the_status_only(
        cluster, data_root: Path) -> None:
    """An API error on create fails the job with the HTTP status, not the server's text;
    what was created before it is deleted."""
    emulator, kubelet = cluster
    emulator["post /apis/batch/v1/namespaces/stimnet-jobs/jobs"] << 403 << {
        "kind": "Status", "message": "jobs is forbidden: quota secret-name"}
    runner = make_runner(emulator, data_root)
    try:
        outcome = await runner.run("job-1", COUNT, data_root / "cat1", MANIFEST)
    finally:
        await runner.shutdown()
    assert (outcome.status, outcome.reason) == (
        "failed", "the cluster refused to create the job (HTTP 403)")
    assert kubelet.live(CONFIGMAPS) == [] and kubelet.live(POLICIES) == []


@pytest.mark.parametrize("node", ["Site A", "-x", "a" * 64])
def test_a_node_name_that_is_no_label_value_is_refused(node: str, data_root: Path) -> None:
    """The node name goes into labels; one Kubernetes cannot carry is refused at start."""
    with pytest.raises(ValueError, match="cannot be a Kubernetes label value"):
        make_runner(None, data_root, node=node)  # type: ignore[arg-type]
