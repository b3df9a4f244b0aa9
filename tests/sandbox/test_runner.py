"""The runner's normal life: happy path into `Partial`s, prewarm (zygotes), cancel, orphan
reaping, and the container settings it asks the engine for."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import numpy as np
import pytest

from stimnet.query.fields import ImageGeometry
from stimnetd.sandbox.image import SandboxImageError, check_image
from stimnetd.sandbox.result import parse_result
from stimnetd.sandbox.runner import LABEL_JOB, WARM_PER_CATALOG, SandboxRunner, _finished_before

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


# Prints which container ran the script (its /etc/hostname mount names it) and whether
# the zygote's libraries were already imported before the script's first import.
WHERE = textwrap.dedent("""
    import re, sys
    preloaded = all(m in sys.modules for m in ("numpy", "pandas", "nibabel", "stimnet_runtime"))
    mountinfo = open("/proc/self/mountinfo").read()
    print("container", re.search(r"/containers/([0-9a-f]{64})/hostname", mountinfo).group(1))
    print("preloaded", preloaded)
    from stimnet_runtime import emit_count
    emit_count("n", 1)
    """)


def _printed(out: Any, key: str) -> str:
    [value] = [line.split()[1] for line in out.log_lines if line.startswith(f"{key} ")]
    return value


async def _wait_for(predicate: Any, what: str) -> None:
    for _ in range(400):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def test_prewarmed_container_is_used_and_refilled(runner, docker_client, catalog: Catalog):
    """After prewarm, a job runs in an already started zygote, and the pool is refilled."""
    await runner.prewarm(catalog.root)
    warm = node_containers(docker_client, runner.node)
    assert [c["State"] for c in warm] == ["running"] * WARM_PER_CATALOG
    assert all(c["Labels"][LABEL_JOB] == "" for c in warm)
    out = await runner.run("warm-job", HAPPY.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert out.prewarmed
    old = {c["Id"] for c in warm}

    async def refilled() -> bool:
        now = await asyncio.to_thread(node_containers, docker_client, runner.node)
        states = [c["State"] for c in now]
        return states == ["running"] * WARM_PER_CATALOG and {c["Id"] for c in now} != old

    await _wait_for(refilled, "the pool is refilled with started zygotes")
    second = await runner.run("warm-job-2", HAPPY.encode(), catalog.root, catalog.manifest)
    assert second.status == "succeeded" and second.prewarmed


async def test_zygote_runs_the_next_job_with_libraries_preloaded(
    runner, docker_client, catalog: Catalog
):
    """The next job runs inside one of the started zygotes, which already imported the libraries."""
    await runner.prewarm(catalog.root)
    warm = {c["Id"] for c in node_containers(docker_client, runner.node)}
    out = await runner.run("zygote-job", WHERE.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert out.prewarmed
    assert _printed(out, "container") in warm
    assert _printed(out, "preloaded") == "True"
    left = {c["Id"] for c in node_containers(docker_client, runner.node)}
    assert _printed(out, "container") not in left, "a zygote must serve exactly one job"


async def test_dead_zygote_falls_back_to_a_fresh_container(runner, docker_client, catalog: Catalog):
    """If every idle zygote was killed, the job transparently runs in a fresh container."""
    await runner.prewarm(catalog.root)
    warm = node_containers(docker_client, runner.node)
    for c in warm:
        docker_client.api.kill(c["Id"])
    out = await runner.run("after-kill", WHERE.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert not out.prewarmed
    assert _printed(out, "container") not in {c["Id"] for c in warm}
    left = {c["Id"] for c in node_containers(docker_client, runner.node)}
    assert not left & {c["Id"] for c in warm}, "the dead zygotes are removed"


async def test_zygote_idle_longer_than_the_timeout_still_runs_a_job(
    runner, docker_client, catalog: Catalog
):
    """The wall-clock limit counts from the hand-over, not from when the zygote started."""
    runner._limits = replace(TEST_LIMITS, timeout_s=1.5)  # noqa: SLF001 - read per container
    await runner.prewarm(catalog.root)
    await asyncio.sleep(3.0)  # idle for twice the job timeout
    states = [c["State"] for c in node_containers(docker_client, runner.node)]
    assert states == ["running"] * WARM_PER_CATALOG
    out = await runner.run("late-job", WHERE.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert out.prewarmed
    spin = await runner.run("spin", b"while True:\n    pass\n", catalog.root, catalog.manifest)
    assert spin.status == "timeout" and spin.prewarmed
    assert spin.reason == "exceeded wall-clock limit 1.5 s"


async def test_idle_zygote_is_replaced_after_the_idle_limit(
    docker_client, sandbox_image: str, catalog: Catalog, tmp_path: Path
):
    """A zygote idle longer than warm_max_idle_s is swapped for a fresh one."""
    import docker

    node = f"idle-{os.getpid()}"
    r = SandboxRunner(
        docker.from_env,
        sandbox_image,
        TEST_LIMITS,
        tmp_path / "idle",
        node=node,
        warm_per_catalog=1,
        warm_max_idle_s=1.0,
    )
    try:
        await r.prewarm(catalog.root)
        [first] = node_containers(docker_client, node)

        async def replaced() -> bool:
            now = await asyncio.to_thread(node_containers, docker_client, node)
            return [c["State"] for c in now] == ["running"] and now[0]["Id"] != first["Id"]

        await _wait_for(replaced, "the idle zygote is replaced")
        out = await r.run("after-recycle", WHERE.encode(), catalog.root, catalog.manifest)
        assert out.status == "succeeded" and out.prewarmed, out
    finally:
        await r.shutdown()
    assert node_containers(docker_client, node) == []
    assert mounts_under(tmp_path / "idle") == []


async def test_cancel_stops_a_job_running_in_a_zygote(runner, docker_client, catalog: Catalog):
    """cancel() kills a zygote that took a job, and run() reports status cancelled."""
    await runner.prewarm(catalog.root)
    task = asyncio.get_running_loop().create_task(
        runner.run("sleepy-warm", b"import time\ntime.sleep(60)\n", catalog.root, catalog.manifest)
    )
    await asyncio.sleep(1.5)
    assert await runner.cancel("sleepy-warm")
    out = await task
    assert out.status == "cancelled" and out.prewarmed
    assert out.result is None


async def test_zygote_job_is_confined_like_a_fresh_one(runner, docker_client, catalog: Catalog):
    """A job run in a zygote has the same user, capabilities, network, read-only /job and
    memory limit as one in a fresh container."""
    await runner.prewarm(catalog.root)
    probe = textwrap.dedent("""
        import errno, os, socket
        print("uid", os.getuid(), os.getgid())
        status = open("/proc/self/status").read().splitlines()
        print([line for line in status if line.startswith(("CapEff", "NoNewPrivs"))])
        print("ifaces", sorted(name for _, name in socket.if_nameindex()))
        try:
            open("/job/x", "w")
        except OSError as exc:
            print("write", errno.errorcode[exc.errno])
        raise SystemExit(3)
        """)
    out = await runner.run("confined", probe.encode(), catalog.root, catalog.manifest)
    assert out.prewarmed
    assert out.reason == "script exited with status 3", out
    logs = "\n".join(out.log_lines)
    assert "uid 65534 65534" in logs
    assert "'CapEff:\\t0000000000000000'" in logs and "'NoNewPrivs:\\t1'" in logs
    assert "ifaces ['lo']" in logs
    assert "write EROFS" in logs
    bomb = b"blob = bytearray(2 * 256 * 1024 * 1024)\n"
    oom = await runner.run("bomb", bomb, catalog.root, catalog.manifest)
    assert oom.prewarmed
    assert oom.reason == "memory limit 256 MiB exceeded (OOM-killed)", oom


def test_exit_time_tells_a_zygote_that_died_before_the_hand_over():
    """Only an engine FinishedAt before the hand-over counts as dying idle; "never" does not."""
    handed_at = 1795600000.5  # 2026-11-25T09:46:40.5Z
    assert _finished_before({"FinishedAt": "2026-11-25T09:46:40.499Z"}, handed_at)
    assert not _finished_before({"FinishedAt": "2026-11-25T09:46:40.501000000Z"}, handed_at)
    assert not _finished_before({"FinishedAt": "2026-11-25T09:46:41Z"}, handed_at)
    assert not _finished_before({"FinishedAt": "0001-01-01T00:00:00Z"}, handed_at)
    assert not _finished_before({}, handed_at)


def _zygote_entrypoint(tmp_path: Path, *, go: bool) -> subprocess.CompletedProcess[str]:
    runtime = Path(__file__).resolve().parents[2] / "sandbox" / "runtime"
    script = tmp_path / "script.py"
    script.write_text("import os, sys\nprint('env', os.environ.get('STIMNET_ZYGOTE'))\nsys.exit(7)\n")
    if go:
        (tmp_path / "go").write_bytes(b"")
    env = {**os.environ, "STIMNET_SCRIPT": str(script), "STIMNET_ZYGOTE": "1",
           "STIMNET_ZYGOTE_IDLE_S": "0.2"}
    return subprocess.run([sys.executable, "-I", "-B", str(runtime / "entrypoint.py")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_zygote_entrypoint_runs_the_script_once_handed_over(tmp_path: Path):
    """In zygote mode the entrypoint runs the script after `go` and hides its own settings."""
    proc = _zygote_entrypoint(tmp_path, go=True)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "env None\n"


def test_idle_zygote_entrypoint_exits_by_itself(tmp_path: Path):
    """A zygote never handed a job exits with status 75 without running the script."""
    proc = _zygote_entrypoint(tmp_path, go=False)
    assert proc.returncode == 75
    assert proc.stdout == ""


async def test_vanished_prewarmed_container_is_replaced(runner, docker_client, catalog: Catalog):
    """If an operator removes the pre-created container, the job still runs in a new one."""
    await runner.prewarm(catalog.root)
    remove_containers(docker_client, node_containers(docker_client, runner.node))
    out = await runner.run("after-prune", HAPPY.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert not out.prewarmed


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
        await _wait_for(cold_job_container, "the job's container exists")
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
    assert out.status == "cancelled" and not out.prewarmed


async def _inspect_new(docker_client: Any, cid: str, task: asyncio.Task[Any]) -> Any:
    """Inspect a container the engine has just listed. The engine lists a container it is
    still creating before it can inspect it (a 404 for a moment, seen here once in ~6
    runs), so retry briefly; a container gone for good means its job ended: say how."""
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
