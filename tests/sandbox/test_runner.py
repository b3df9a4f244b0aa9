"""The runner's normal life: happy path into `Partial`s, cancel, orphan reaping, shutdown,
the container settings it asks the engine for, and the image check (real engine)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import docker
import numpy as np
import pytest

from stimnet.query.fields import ImageGeometry
from stimnetd.sandbox import (
    LABEL_JOB,
    WARM_PER_CATALOG,
    SandboxImageError,
    SandboxRunner,
    check_image,
    parse_result,
)

from .conftest import (
    AGES,
    FIELDS,
    HAPPY,
    TEST_LIMITS,
    UPDRS,
    Catalog,
    engine_api,
    mounts_under,
    node_containers,
    remove_containers,
    run_attack,
    wait_for,
)

pytestmark = pytest.mark.docker


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


async def test_missing_image_raises_with_the_fix(docker_client, catalog: Catalog, tmp_path: Path):
    """A runner pointed at an absent image says how to build it."""
    r = SandboxRunner(
        engine_api, "stimnet-sandbox:absent", TEST_LIMITS, tmp_path / "s", node="no-image"
    )
    try:
        with pytest.raises(SandboxImageError, match="run sandbox/build-offline.sh"):
            await r.run("j", b"pass\n", catalog.root, catalog.manifest)
    finally:
        await r.shutdown()
    assert node_containers(docker_client, "no-image") == []


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
    assert await runner.cancel("sleepy") is True
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
    node = "reap-test-node"
    crashed = SandboxRunner(engine_api, sandbox_image, TEST_LIMITS, tmp_path / "s", node=node)
    await crashed.prewarm(catalog.root)  # then "crash": no shutdown
    bystander = SandboxRunner(
        engine_api, sandbox_image, TEST_LIMITS, tmp_path / "b", node="other-node"
    )
    await bystander.prewarm(catalog.root)
    try:
        fresh = SandboxRunner(
            engine_api, sandbox_image, TEST_LIMITS, tmp_path / "s", node=node
        )
        assert await fresh.reap_orphans() == WARM_PER_CATALOG
        assert node_containers(docker_client, node) == []
        assert len(node_containers(docker_client, "other-node")) == WARM_PER_CATALOG
        assert list((tmp_path / "s" / "work").iterdir()) == []
        assert mounts_under(tmp_path / "s") == []
        await fresh.shutdown()
    finally:
        await bystander.shutdown()
        remove_containers(docker_client, node_containers(docker_client, node))
    assert node_containers(docker_client, "other-node") == []


async def test_container_settings_are_locked_down(
    runner, docker_client, catalog: Catalog, tmp_path: Path
):
    """The engine receives every mandatory hardening setting, for zygotes and fresh containers."""
    await runner.prewarm(catalog.root)
    warm = node_containers(docker_client, runner.node)
    assert len(warm) == WARM_PER_CATALOG
    for c in warm:
        attrs = docker_client.api.inspect_container(c["Id"])
        _assert_locked_down(attrs)
        assert "STIMNET_ZYGOTE=1" in attrs["Config"]["Env"]
    # A catalog with no zygote gets a container made for the job.
    other = tmp_path / "no-zygote"
    other.mkdir(mode=0o755)
    task = asyncio.get_running_loop().create_task(
        runner.run("cold-job", b"import time\ntime.sleep(60)\n", other, catalog.manifest)
    )

    async def cold_job_container() -> bool:
        now = await asyncio.to_thread(node_containers, docker_client, runner.node)
        return any(c["Labels"][LABEL_JOB] == "cold-job" for c in now)

    try:
        await wait_for(cold_job_container, "the job's container exists")
        [cold] = [
            c for c in node_containers(docker_client, runner.node)
            if c["Labels"][LABEL_JOB] == "cold-job"
        ]
        attrs = await _inspect_new(docker_client, cold["Id"], task)
        _assert_locked_down(attrs)
        assert "STIMNET_ZYGOTE=1" not in attrs["Config"]["Env"]
    finally:
        await runner.cancel("cold-job")
        out = await task
    assert (out.status, out.prewarmed) == ("cancelled", False)


async def _inspect_new(docker_client: Any, cid: str, task: asyncio.Task[Any]) -> Any:
    """Inspect a container the engine has just listed. The engine lists a container it is
    still creating before it can inspect it (a 404 meanwhile), so retry briefly; a
    container gone for good means its job ended: say how."""
    for _ in range(50):
        try:
            return docker_client.api.inspect_container(cid)
        except docker.errors.NotFound:
            if task.done():
                out = task.result()
                raise AssertionError(f"the job ended early: {out.status}: {out.reason}; "
                                     f"exit {out.exit_code}; log {out.log_lines}") from None
            await asyncio.sleep(0.1)
    raise AssertionError(f"container {cid[:12]} listed but never inspectable")


def _assert_locked_down(attrs: dict[str, Any]) -> None:
    host: dict[str, Any] = attrs["HostConfig"]
    config: dict[str, Any] = attrs["Config"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host.get("CapAdd") in (None, [])
    nnp, seccomp = host["SecurityOpt"]  # our own seccomp profile, on top of Docker's default
    assert nnp == "no-new-privileges"
    profile = json.loads(seccomp.removeprefix("seccomp="))
    allowed = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
               for n in rule["names"]}
    assert seccomp.startswith("seccomp=") and "io_uring_setup" not in allowed
    assert host["Privileged"] is False
    assert host["PidsLimit"] == TEST_LIMITS.pids
    assert host["Memory"] == host["MemorySwap"] == TEST_LIMITS.memory_bytes
    assert host["NanoCpus"] == int(TEST_LIMITS.cpus * 1e9)
    assert host["Tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size={TEST_LIMITS.tmpfs_bytes}"}
    assert host["LogConfig"]["Type"] == "json-file"
    assert host["LogConfig"]["Config"]["max-size"] == "64k"
    assert host["AutoRemove"] is False
    mounts = {m["Target"]: m for m in host["Mounts"]}
    etc = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
    # A private workspace (a daemon that may mount) gives /etc's files itself.
    assert set(mounts) in ({"/data", "/job", "/out"}, {"/data", "/job", "/out"} | etc)
    assert all(mounts[t]["ReadOnly"] for t in set(mounts) - {"/out"})
    assert mounts["/out"].get("ReadOnly", False) is False
    assert [m["Source"] for m in host["Mounts"] if "docker.sock" in m["Source"]] == []
    assert config["User"] == "65534:65534"
    assert config["WorkingDir"] == "/job"
    assert config["Entrypoint"] == ["python3", "-I", "-B", "/opt/stimnet/entrypoint.py"]


def test_check_image_accepts_the_built_image(docker_client, sandbox_image: str):
    """check_image returns the image id when tag and version label match."""
    version = (Path(__file__).resolve().parents[2] / "sandbox" / "VERSION").read_text().strip()
    image_id = check_image(docker_client, sandbox_image, version)
    assert image_id == docker_client.images.get(sandbox_image).id
    assert image_id.startswith("sha256:")


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
