"""What a job can learn about its host from inside its container (real engine): its mount
list names no host path, neither in a fresh container nor in a zygote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stimnetd.sandbox import SandboxRunner, parse_result

from .conftest import FIELDS, Catalog, dedent_script, logs_of, run_attack, with_limits

pytestmark = pytest.mark.docker

MOUNTINFO = dedent_script("""
    from stimnet_runtime import emit_count, load_table
    for line in open("/proc/self/mountinfo"):
        print("mount", line.rstrip())
    print("hosts", open("/etc/hosts").read().split())
    emit_count("n", len(load_table("subjects")))
    """)


def _n(out: Any, rows: int) -> int:
    [partial] = parse_result(out.result, out.arrays, FIELDS, rows)
    return partial.n


def _mounts(out: Any) -> list[str]:
    return [line[len("mount "):] for line in out.log_lines if line.startswith("mount ")]


def _host_paths(docker_client: Any, catalog: Catalog, runner: SandboxRunner,
                tmp_path: Path) -> list[str]:
    state = runner._workspaces.parent.parent  # noqa: SLF001 - the runner's state dir
    return [str(catalog.root), str(state), str(tmp_path),
            docker_client.info()["DockerRootDir"], "/containers/"]


def _require_private(runner: SandboxRunner) -> None:
    if not runner.out_tmpfs:
        pytest.skip("private workspaces need a daemon that may mount (root)")


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "zygote"])
async def test_the_mount_list_names_no_host_path(runner, docker_client, catalog: Catalog,
                                                 tmp_path: Path, warm: bool):
    """Every line of the job's /proc/self/mountinfo is free of the catalog root, the state
    directory and the engine's directory; /data, /job and the three /etc files come from
    the job's own tmpfs, and /data still holds the catalog."""
    _require_private(runner)
    if warm:
        await runner.prewarm(catalog.root)
        out = await runner.run("warm", MOUNTINFO.encode(), catalog.root, catalog.manifest)
    else:
        out = await run_attack(runner, docker_client, catalog, MOUNTINFO)
    assert out.status == "succeeded", out
    assert out.prewarmed is warm
    assert _n(out, catalog.rows) == catalog.rows
    mounts = _mounts(out)
    assert len(mounts) > 10, logs_of(out)
    leaks = [(path, line) for line in mounts
             for path in _host_paths(docker_client, catalog, runner, tmp_path) if path in line]
    assert leaks == []
    by_target = {line.split()[4]: line for line in mounts}
    for target in ("/data", "/job", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"):
        assert by_target[target].split(" - ")[1].split()[:2] == ["tmpfs", "stimnet-job"], target
    assert by_target["/out"].split(" - ")[1].split()[:2] == ["tmpfs", "stimnet-out"]
    assert "localhost" in logs_of(out)


async def test_a_catalog_over_the_copy_limit_is_bound_and_still_readable(
        runner, docker_client, catalog: Catalog):
    """Past `data_copy_bytes` the catalog is bound, not copied: the job still reads it (and
    its mount list then shows the catalog's path, as the README says)."""
    _require_private(runner)
    with_limits(runner, data_copy_bytes=1)
    out = await run_attack(runner, docker_client, catalog, MOUNTINFO)
    assert out.status == "succeeded", out
    assert _n(out, catalog.rows) == catalog.rows
    [data] = [line for line in _mounts(out) if line.split()[4] == "/data"]
    assert data.split()[3] == str(catalog.root)


# -- the page cache ------------------------------------------------------------------------

FILES = [f"pc/f{i:02d}.bin" for i in range(16)]
EVICT = dedent_script("""
    import os
    for name in sorted(os.listdir("/data/pc")):
        fd = os.open(f"/data/pc/{name}", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    print("evicted")
    """)
PROBE = dedent_script("""
    import errno, json, os
    cached = {}
    for name in sorted(os.listdir("/data/pc")):
        fd = os.open(f"/data/pc/{name}", os.O_RDONLY)
        try:
            cached[name] = "cached" if os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT) else "?"
        except BlockingIOError:
            cached[name] = "not cached"
        except OSError as exc:  # a filesystem without non-blocking reads: nothing to learn
            cached[name] = errno.errorcode.get(exc.errno, str(exc.errno))
        os.close(fd)
    print("probe", json.dumps(cached))
    """)


def _victim(names: list[str]) -> str:
    return dedent_script(f"""
        for name in {names!r}:
            open("/data/" + name, "rb").read()
        print("read", len({names!r}))
        """)


async def _probe_after(runner: SandboxRunner, catalog: Catalog, read: list[str],
                       tag: str) -> dict[str, str]:
    """Evict, let a victim job read `read`, probe: what the attacker saw of each file."""
    import json

    for step, script in (("evict", EVICT), ("victim", _victim(read)), ("probe", PROBE)):
        out = await runner.run(f"{tag}-{step}", script.encode(), catalog.root, catalog.manifest)
        assert any(line.split()[0] in ("evicted", "read", "probe") for line in out.log_lines), out
    [line] = [line for line in out.log_lines if line.startswith("probe ")]
    return {f"pc/{name}": seen for name, seen in json.loads(line[len("probe "):]).items()}


@pytest.fixture
def probed_catalog(catalog: Catalog) -> Catalog:
    (catalog.root / "pc").mkdir()
    for name in FILES:
        with open(catalog.root / name, "wb") as fh:
            fh.write(os.urandom(64 * 1024))
            # Written back, so an eviction can drop the pages (dirty ones stay).
            fh.flush()
            os.fsync(fh.fileno())
    return catalog


async def test_the_page_cache_probe_learns_nothing_of_another_jobs_reads(
        runner, docker_client, probed_catalog: Catalog):
    """The attack of issue 21: a job evicts the catalog's files from the page cache, a
    victim job reads some of them, and a third probes which are cached with
    preadv2(RWF_NOWAIT). Each job reads its own copy (a tmpfs, which on this kernel refuses
    non-blocking reads outright), so what the probe sees is the same whichever files the
    victim read. Control: with the catalog bound (over the copy limit) the same probe
    finds exactly the victim's files."""
    _require_private(runner)
    first, second = FILES[:5], FILES[8:11]
    seen_first = await _probe_after(runner, probed_catalog, first, "a")
    seen_second = await _probe_after(runner, probed_catalog, second, "b")
    assert seen_first == seen_second
    assert len(set(seen_first.values())) == 1, seen_first
    with_limits(runner, data_copy_bytes=1)
    bound = await _probe_after(runner, probed_catalog, first, "c")
    assert {name for name, seen in bound.items() if seen == "cached"} == set(first), bound
