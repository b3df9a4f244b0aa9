"""The runner's normal life: happy path into `Partial`s, prewarm, cancel, orphan reaping,
and the container settings it asks the engine for."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stimnetd.catalog_types import ImageGeometry
from stimnetd.sandbox.image import SandboxImageError, check_image
from stimnetd.sandbox.result import parse_result
from stimnetd.sandbox.runner import LABEL_JOB, SandboxRunner

from .conftest import (
    AGES,
    FIELDS,
    TEST_LIMITS,
    UPDRS,
    Catalog,
    mounts_under,
    node_containers,
    remove_containers,
    run_attack,
)

pytestmark = pytest.mark.docker

HAPPY = textwrap.dedent("""
    from stimnet_runtime import *
    subjects = load_table("subjects")
    outcomes = load_table("outcomes")
    frame = subjects.merge(outcomes, on="subject")
    emit_count("n", len(frame))
    emit_mean("avg(updrs_change)", "updrs_change", frame["updrs_change"])
    emit_histogram("age_hist", "age", frame["age"], [40, 60, 80])
    for target, part in frame.groupby("target"):
        emit_count("n_by_target", len(part), group={"target": target})
    emit_regression("updrs~age", "updrs_change", ["age"], frame)
    """)


async def test_happy_path_parses_into_partials(runner, docker_client, catalog: Catalog):
    """count, mean, histogram, grouped counts and a regression come back as exact Partials."""
    out = await run_attack(runner, docker_client, catalog, HAPPY, job_id="happy")
    assert out.status == "succeeded", out
    assert out.reason == "ok"
    partials = {
        (p.name, p.group): p for p in parse_result(out.result, out.arrays, FIELDS, catalog.rows)
    }

    assert partials[("n", ())].n == len(AGES)
    mean = partials[("avg(updrs_change)", ())]
    assert mean.kind == "moments"
    assert mean.stats["s1"][0] == pytest.approx(sum(UPDRS))
    assert mean.stats["s2"][0] == pytest.approx(sum(u * u for u in UPDRS))
    hist = partials[("age_hist", ())]
    expected = [
        sum(a < 40 for a in AGES),
        sum(40 <= a < 60 for a in AGES),
        sum(60 <= a <= 80 for a in AGES),
        sum(a > 80 for a in AGES),
    ]
    assert hist.stats["counts"].tolist() == expected
    assert partials[("n_by_target", (("target", "STN"),))].n == 5
    reg = partials[("updrs~age", ())]
    z = np.column_stack([np.ones(len(AGES)), AGES, UPDRS])
    np.testing.assert_allclose(reg.stats["m"], z.T @ z)
    assert reg.meta == {
        "func": "regression",
        "fields": ["age", "updrs_change"],
        "purpose": "regression",
    }


async def test_voxel_map_travels_as_npy(runner, docker_client, catalog: Catalog, tmp_path: Path):
    """A voxel map built from catalog images comes back through an .npy side file."""
    images = catalog.root / "vta"
    images.mkdir(mode=0o755)
    shape = (40, 40, 8)
    for i in range(3):
        mask = np.zeros(shape, dtype=np.uint8)
        mask[i : i + 10, 5:15, 2:5] = 1
        np.save(images / f"s{i:02d}.npy", mask)
        (images / f"s{i:02d}.npy").chmod(0o644)
    (catalog.root / "vta.csv").write_text(
        "subject,vta\n" + "".join(f"s{i:02d},vta/s{i:02d}.npy\n" for i in range(3))
    )
    (catalog.root / "vta.csv").chmod(0o644)
    catalog.manifest["tables"]["vta"] = "vta.csv"
    fields = {**FIELDS, "vta": FIELDS["age"].__class__("vta", "vta", "image", max_voxels=300)}
    script = textwrap.dedent("""
        import numpy as np
        from stimnet_runtime import load_images, emit_voxel_map
        count = None
        for _, img in load_images("vta"):
            hit = (img > 0).astype(float)
            count = hit if count is None else count + hit
        emit_voxel_map("vta_count", "vta", count)
        """)
    out = await run_attack(runner, docker_client, catalog, script, job_id="voxels")
    assert out.status == "succeeded", out
    geometry = {"vta": ImageGeometry(shape, (1.0, 1.0, 1.0), tuple(map(tuple, np.eye(4))), "mni")}
    [partial] = parse_result(out.result, out.arrays, fields, catalog.rows, geometry=geometry)
    assert partial.n == 3
    assert partial.stats["count"].shape == shape
    assert partial.stats["count"].sum() == 3 * 300
    assert partial.meta["affine"] == np.eye(4).tolist()
    assert partial.meta["func"] == "count_map"


async def test_prewarmed_container_is_used_and_refilled(runner, docker_client, catalog: Catalog):
    """After prewarm, a job starts the pre-created container and a new one is made."""
    await runner.prewarm(catalog.root)
    [warm] = node_containers(docker_client, runner.node)
    assert warm["State"] == "created"
    assert warm["Labels"][LABEL_JOB] == ""
    out = await runner.run("warm-job", HAPPY.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert out.prewarmed
    for _ in range(100):
        refill = node_containers(docker_client, runner.node)
        if refill:
            break
        await asyncio.sleep(0.05)
    assert [c["State"] for c in refill] == ["created"]
    assert refill[0]["Id"] != warm["Id"]
    second = await runner.run("warm-job-2", HAPPY.encode(), catalog.root, catalog.manifest)
    assert second.status == "succeeded" and second.prewarmed


async def test_vanished_prewarmed_container_is_replaced(runner, docker_client, catalog: Catalog):
    """If an operator removes the pre-created container, the job still runs in a new one."""
    await runner.prewarm(catalog.root)
    remove_containers(docker_client, node_containers(docker_client, runner.node))
    out = await runner.run("after-prune", HAPPY.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out


async def test_missing_image_raises_with_the_fix(docker_client, catalog: Catalog, tmp_path: Path):
    """A runner pointed at an absent image says how to build it."""
    import docker

    r = SandboxRunner(
        docker.from_env, "stimnet-sandbox:absent", TEST_LIMITS, tmp_path / "s", node="no-image"
    )
    try:
        with pytest.raises(SandboxImageError, match="run sandbox/build-offline.sh"):
            await r.run("j", b"pass\n", catalog.root, catalog.manifest)
    finally:
        await r.shutdown()
    assert node_containers(docker_client, "no-image") == []


async def test_job_on_another_catalog_does_not_take_the_warm_container(
    runner, docker_client, catalog: Catalog, tmp_path: Path
):
    """A warm container is bound to its catalog mount, so other catalogs get a fresh one."""
    other = tmp_path / "other-catalog"
    other.mkdir(mode=0o755)
    await runner.prewarm(other)
    out = await runner.run(
        "cold",
        b"from stimnet_runtime import emit_count\nemit_count('n', 1)\n",
        catalog.root,
        catalog.manifest,
    )
    assert out.status == "succeeded", out
    assert not out.prewarmed


async def test_cancel_stops_a_running_job(runner, docker_client, catalog: Catalog):
    """cancel() kills the container and run() reports status cancelled."""
    task = asyncio.get_running_loop().create_task(
        runner.run("sleepy", b"import time\ntime.sleep(60)\n", catalog.root, catalog.manifest)
    )
    for _ in range(200):
        if await asyncio.to_thread(node_containers, docker_client, runner.node):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert await runner.cancel("sleepy")
    out = await task
    assert out.status == "cancelled"
    assert out.result is None
    assert node_containers(docker_client, runner.node) == []


async def test_cancelling_the_run_task_still_removes_the_container(
    runner, docker_client, catalog: Catalog
):
    """If the caller's task is cancelled mid-job, the container is still removed."""
    task = asyncio.get_running_loop().create_task(
        runner.run("abandoned", b"import time\ntime.sleep(60)\n", catalog.root, catalog.manifest)
    )
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert node_containers(docker_client, runner.node) == []


async def test_reap_orphans_removes_a_crashed_runners_containers(
    docker_client, sandbox_image: str, catalog: Catalog, tmp_path: Path
):
    """Containers left by a runner that died are removed by the next runner of that node."""
    import docker

    node = "reap-test-node"
    crashed = SandboxRunner(docker.from_env, sandbox_image, TEST_LIMITS, tmp_path / "s", node=node)
    await crashed.prewarm(catalog.root)  # then "crash": no shutdown
    bystander = SandboxRunner(
        docker.from_env, sandbox_image, TEST_LIMITS, tmp_path / "b", node="other-node"
    )
    await bystander.prewarm(catalog.root)
    try:
        fresh = SandboxRunner(
            docker.from_env, sandbox_image, TEST_LIMITS, tmp_path / "s", node=node
        )
        assert await fresh.reap_orphans() == 1
        assert node_containers(docker_client, node) == []
        assert len(node_containers(docker_client, "other-node")) == 1
        assert list((tmp_path / "s" / "work").iterdir()) == []
        assert mounts_under(tmp_path / "s") == []
        await fresh.shutdown()
    finally:
        await bystander.shutdown()
        remove_containers(docker_client, node_containers(docker_client, node))
    assert node_containers(docker_client, "other-node") == []


async def test_container_settings_are_locked_down(runner, docker_client, catalog: Catalog):
    """The engine receives every mandatory hardening setting for a job container."""
    await runner.prewarm(catalog.root)
    [c] = node_containers(docker_client, runner.node)
    attrs = docker_client.api.inspect_container(c["Id"])
    host: dict[str, Any] = attrs["HostConfig"]
    config: dict[str, Any] = attrs["Config"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host.get("CapAdd")
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert host["PidsLimit"] == TEST_LIMITS.pids
    assert host["Memory"] == host["MemorySwap"] == TEST_LIMITS.memory_bytes
    assert host["NanoCpus"] == int(TEST_LIMITS.cpus * 1e9)
    assert host["Tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size={TEST_LIMITS.tmpfs_bytes}"}
    assert host["LogConfig"]["Type"] == "json-file"
    assert host["LogConfig"]["Config"]["max-size"] == "64k"
    assert host["AutoRemove"] is False
    mounts = {m["Target"]: m for m in host["Mounts"]}
    assert set(mounts) == {"/data", "/job", "/out"}
    assert mounts["/data"]["ReadOnly"] and mounts["/job"]["ReadOnly"]
    assert not mounts["/out"].get("ReadOnly")
    assert all("docker.sock" not in m["Source"] for m in host["Mounts"])
    assert config["User"] == "65534:65534"
    assert config["WorkingDir"] == "/job"
    assert config["Entrypoint"] == ["python3", "-I", "-B", "/opt/stimnet/entrypoint.py"]


def test_check_image_accepts_the_built_image(docker_client, sandbox_image: str):
    """check_image returns the image id when tag and version label match."""
    version = (Path(__file__).resolve().parents[2] / "sandbox" / "VERSION").read_text().strip()
    assert check_image(docker_client, sandbox_image, version).startswith("sha256:")


def test_check_image_names_the_fix_when_missing(docker_client):
    """A missing image raises an error that tells the operator to run the offline build."""
    with pytest.raises(SandboxImageError, match="run sandbox/build-offline.sh"):
        check_image(docker_client, "stimnet-sandbox:does-not-exist", "0.1.0")


def test_check_image_refuses_a_version_mismatch(docker_client, sandbox_image: str):
    """An image whose version label differs from the expected one is refused."""
    with pytest.raises(SandboxImageError, match="expects 9.9.9"):
        check_image(docker_client, sandbox_image, "9.9.9")


async def test_shutdown_cancels_running_jobs_and_warm_containers(
    runner, docker_client, catalog: Catalog
):
    """shutdown() ends running jobs as cancelled, removes warm containers, and is idempotent."""
    await runner.prewarm(catalog.root)
    task = asyncio.get_running_loop().create_task(
        runner.run("long", b"import time\ntime.sleep(60)\n", catalog.root, catalog.manifest)
    )
    await asyncio.sleep(1.5)
    await runner.shutdown()
    out = await task
    assert out.status == "cancelled"
    assert node_containers(docker_client, runner.node) == []
    await runner.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        await runner.run("late", b"pass\n", catalog.root, catalog.manifest)
