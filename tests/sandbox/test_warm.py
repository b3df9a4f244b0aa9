"""Pre-started zygote containers: used, refilled, recycled when idle, replaced when lost,
bound to their catalog, and confined like a fresh container (real engine)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from stimnetd.sandbox import LABEL_JOB, WARM_PER_CATALOG, SandboxRunner

from .conftest import (
    HAPPY,
    TEST_LIMITS,
    Catalog,
    engine_api,
    mounts_under,
    node_containers,
    remove_containers,
    wait_for,
    with_limits,
)

pytestmark = pytest.mark.docker


# Prints which container ran the script (its cgroup names it) and whether
# the zygote's libraries were already imported before the script's first import.
WHERE = textwrap.dedent("""
    import re, sys
    preloaded = all(m in sys.modules for m in ("numpy", "pandas", "nibabel", "stimnet_runtime"))
    cgroup = open("/proc/self/cgroup").read()
    print("container", re.search(r"([0-9a-f]{64})", cgroup).group(1))
    print("preloaded", preloaded)
    from stimnet_runtime import emit_count
    emit_count("n", 1)
    """)


def _printed(out: Any, key: str) -> str:
    [value] = [line.split()[1] for line in out.log_lines if line.startswith(f"{key} ")]
    return value


async def test_prewarmed_container_is_used_and_refilled(runner, docker_client, catalog: Catalog):
    """After prewarm, a job runs in an already started zygote, and the pool is refilled."""
    await runner.prewarm(catalog.root)
    warm = node_containers(docker_client, runner.node)
    assert [c["State"] for c in warm] == ["running"] * WARM_PER_CATALOG
    assert [c["Labels"][LABEL_JOB] for c in warm] == [""] * WARM_PER_CATALOG
    out = await runner.run("warm-job", HAPPY.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert out.prewarmed is True
    old = {c["Id"] for c in warm}

    async def refilled() -> bool:
        now = await asyncio.to_thread(node_containers, docker_client, runner.node)
        states = [c["State"] for c in now]
        return states == ["running"] * WARM_PER_CATALOG and {c["Id"] for c in now} != old

    await wait_for(refilled, "the pool is refilled with started zygotes")
    second = await runner.run("warm-job-2", HAPPY.encode(), catalog.root, catalog.manifest)
    assert (second.status, second.prewarmed) == ("succeeded", True), second


async def test_zygote_runs_the_next_job_with_libraries_preloaded(
    runner, docker_client, catalog: Catalog
):
    """The next job runs inside one of the started zygotes, which already imported the libraries."""
    await runner.prewarm(catalog.root)
    warm = {c["Id"] for c in node_containers(docker_client, runner.node)}
    out = await runner.run("zygote-job", WHERE.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert out.prewarmed is True
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
    assert out.prewarmed is False
    assert _printed(out, "container") not in {c["Id"] for c in warm}
    left = {c["Id"] for c in node_containers(docker_client, runner.node)}
    assert left & {c["Id"] for c in warm} == set(), "the dead zygotes are removed"


async def test_zygote_idle_longer_than_the_timeout_still_runs_a_job(
    runner, docker_client, catalog: Catalog
):
    """The wall-clock limit counts from the hand-over, not from when the zygote started."""
    with_limits(runner, timeout_s=1.5)
    await runner.prewarm(catalog.root)
    await asyncio.sleep(3.0)  # idle for twice the job timeout
    states = [c["State"] for c in node_containers(docker_client, runner.node)]
    assert states == ["running"] * WARM_PER_CATALOG
    out = await runner.run("late-job", WHERE.encode(), catalog.root, catalog.manifest)
    assert out.status == "succeeded", out
    assert out.prewarmed is True
    spin = await runner.run("spin", b"while True:\n    pass\n", catalog.root, catalog.manifest)
    assert (spin.status, spin.prewarmed) == ("timeout", True)
    assert spin.reason == "exceeded wall-clock limit 1.5 s"


async def test_idle_zygote_is_replaced_after_the_idle_limit(
    docker_client, sandbox_image: str, catalog: Catalog, tmp_path: Path
):
    """A zygote idle longer than warm_max_idle_s is swapped for a fresh one."""
    node = f"idle-{os.getpid()}"
    r = SandboxRunner(
        engine_api,
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

        await wait_for(replaced, "the idle zygote is replaced")
        out = await r.run("after-recycle", WHERE.encode(), catalog.root, catalog.manifest)
        assert (out.status, out.prewarmed) == ("succeeded", True), out
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
    assert await runner.cancel("sleepy-warm") is True
    out = await task
    assert (out.status, out.prewarmed) == ("cancelled", True)
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
    assert out.prewarmed is True
    assert out.reason == "script exited with status 3", out
    logs = "\n".join(out.log_lines)
    assert "uid 65534 65534" in logs
    assert "'CapEff:\\t0000000000000000'" in logs
    assert "'NoNewPrivs:\\t1'" in logs
    assert "ifaces ['lo']" in logs
    assert "write EROFS" in logs
    bomb = b"blob = bytearray(2 * 256 * 1024 * 1024)\n"
    oom = await runner.run("bomb", bomb, catalog.root, catalog.manifest)
    assert oom.prewarmed is True
    assert oom.reason == "memory limit 256 MiB exceeded (OOM-killed)", oom


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
    assert out.prewarmed is False


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
    assert out.prewarmed is False
