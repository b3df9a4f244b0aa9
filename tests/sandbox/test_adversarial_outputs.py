"""Hostile scripts against the real runner and engine: output, result and reason.

A script controls everything it writes, to /out and to stdout/stderr: each trick must
end with a reason naming the rule, release nothing, and never echo what the script
chose. (Confinement attacks are in test_adversarial.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import docker.errors
import pytest

from stimnetd.sandbox import SandboxRunner

from .conftest import (
    TEST_LIMITS,
    Catalog,
    assert_refused,
    dedent_script,
    engine_api,
    logs_of,
    node_containers,
    run_attack,
    with_limits,
)

pytestmark = pytest.mark.docker


async def test_gigabyte_of_stdout_is_bounded(runner, docker_client, catalog: Catalog):
    """1 GB of stdout neither fills the disk (log capped by max-size) nor the outcome."""
    with_limits(runner, timeout_s=8.0)
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch_log_file() -> None:
        while not stop.is_set():
            for c in await asyncio.to_thread(node_containers, docker_client, runner.node):
                # The container (and its log) may be removed between listing and stat.
                with contextlib.suppress(FileNotFoundError, docker.errors.NotFound):
                    info = await asyncio.to_thread(docker_client.api.inspect_container, c["Id"])
                    seen.append(await asyncio.to_thread(os.path.getsize, info["LogPath"]))
            await asyncio.sleep(0.2)

    watcher = asyncio.get_running_loop().create_task(watch_log_file())
    try:
        out = await run_attack(
            runner,
            docker_client,
            catalog,
            dedent_script("""
            import sys
            chunk = "x" * (1 << 20) + "\\n"
            for _ in range(1024):
                sys.stdout.write(chunk)
            """),
        )
    finally:
        stop.set()
        await watcher
    assert_refused(out, "failed", "timeout")
    assert out.reason in (
        "exceeded wall-clock limit 8 s",
        "script emitted no aggregates (no result file)",
    )
    assert len(seen) > 0, "the log file was never observed"
    # json-file rotates at max-size (64k here); one over-long line may overshoot once.
    assert max(seen) < 8 * 1024 * 1024
    assert sum(len(line) for line in out.log_lines) <= TEST_LIMITS.log_bytes


async def test_oversized_result_file_is_refused(runner, docker_client, catalog: Catalog):
    """A result file past the size cap is cut by RLIMIT_FSIZE and the job fails."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        with open("/out/result.json", "w") as fh:
            fh.write('{"version": 1, "aggregates": [' + " " * (2 << 20) + "]}")
        """),
    )
    assert_refused(out)
    assert out.reason == "output exceeded result limit 1 MiB (write refused)"


async def test_output_spread_over_files_is_killed(runner, docker_client, catalog: Catalog):
    """Many files under the per-file cap but over the total cap get the job killed."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        import time
        for i in range(4):
            with open(f"/out/pad{i}", "wb") as fh:
                fh.write(b"\\0" * (400 << 10))
        time.sleep(15)
        """),
    )
    assert_refused(out)
    # Killed by the monitor (plain dir) or refused by the tmpfs (root daemons).
    assert out.reason in (
        "output exceeded result limit 1 MiB (killed)",
        "output exceeded result limit 1 MiB (write refused)",
    )


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ('os.symlink("/etc/passwd", "/out/result.json")', "result file is a symlink: refused"),
        (
            'open("/out/real", "w").write(\'{"version": 1, "aggregates": []}\'); '
            'os.link("/out/real", "/out/result.json")',
            "result file has more than one hard link: refused",
        ),
        ('os.mkfifo("/out/result.json")', "result file is not a regular file: refused"),
        # A directory anywhere in /out is refused before the result is read.
        ('os.mkdir("/out/result.json")',
         "a subdirectory in the output directory (results are files)"),
    ],
    ids=["symlink", "hardlink", "fifo", "directory"],
)
async def test_result_file_tricks_are_refused(
    runner, docker_client, catalog: Catalog, setup, reason
):
    """A result that is a symlink, hard link, FIFO or directory is refused, not followed."""
    out = await run_attack(runner, docker_client, catalog, f"import os\n{setup}\n")
    assert_refused(out)
    # A directory may be seen by the output watcher while the script still runs (which
    # stops it: "(killed)") or after it exits, as the machine's timing falls.
    assert out.reason in (reason, f"{reason} (killed)")


async def test_npy_side_file_symlink_is_refused(runner, docker_client, catalog: Catalog):
    """An .npy reference that is a symlink is refused like the result file itself."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        import json, os
        os.symlink("/etc/passwd", "/out/a.npy")
        doc = {"version": 1, "aggregates": [{"kind": "voxel_map", "name": "v", "n": 1,
               "stats": {"count": {"npy": "a.npy"}}, "meta": {"column": "x", "shape": [1]}}]}
        open("/out/result.json", "w").write(json.dumps(doc))
        """),
    )
    assert_refused(out)
    assert out.reason == "an array file is a symlink: refused"


async def test_traceback_text_is_not_released(runner, docker_client, catalog: Catalog):
    """An exception message that quotes data appears nowhere in the outcome."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        from stimnet_runtime import load_table
        df = load_table("subjects")
        raise KeyError(f"patient {df['subject'][0]} age {df['age'][0]}")
        """),
    )
    assert_refused(out)
    assert out.reason == "script raised KeyError at line 3"
    assert "s00" not in logs_of(out)
    assert "s00" not in out.reason


async def test_partial_results_of_failed_script_are_discarded(runner, docker_client, catalog):
    """Aggregates emitted before a crash are not released."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        from stimnet_runtime import emit_count
        emit_count("n", 10)
        1 / 0
        """),
    )
    assert_refused(out)
    assert out.reason == "script raised ZeroDivisionError at line 3"


async def test_forged_marker_on_stdout_does_not_become_reason(runner, docker_client, catalog):
    """Only stderr is searched for the runtime marker, and only in its strict form."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        dedent_script("""
        import sys
        print("stimnet-runtime: age=71 at line 5")
        sys.stderr.write("stimnet-runtime: patient s00 is 71\\n")
        raise SystemExit(4)
        """),
    )
    assert_refused(out)
    assert out.reason == "script exited with status 4"


async def test_custom_exception_names_are_not_echoed(runner, docker_client, catalog: Catalog):
    """An exception class named after a value is reported generically, not by its name."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        "class Age71(Exception):\n    pass\nraise Age71()\n",
    )
    assert_refused(out)
    assert out.reason == "script raised an exception at line 3"


async def test_too_many_output_files_are_refused(runner, docker_client, catalog: Catalog):
    """Creating more files than the output file limit fails the job, naming the limit."""
    out = await run_attack(
        runner,
        docker_client,
        catalog,
        "for i in range(1000):\n    open(f'/out/f{i}', 'w').close()\n",
    )
    assert_refused(out)
    assert out.reason in (
        f"output exceeded {TEST_LIMITS.output_files} files (killed)",
        f"output exceeded {TEST_LIMITS.output_files} files (write refused)",
    )


async def test_plain_output_dir_is_policed_by_the_monitor(
    docker_client, sandbox_image: str, catalog: Catalog, tmp_path
):
    """Without the tmpfs (non-root daemons), the size monitor kills an oversized output."""
    runner = SandboxRunner(
        engine_api,
        sandbox_image,
        TEST_LIMITS,
        tmp_path / "plain",
        node=f"plain-{os.getpid()}",
        out_tmpfs=False,
    )
    try:
        out = await run_attack(
            runner,
            docker_client,
            catalog,
            dedent_script("""
            import time
            for i in range(4):
                with open(f"/out/pad{i}", "wb") as fh:
                    fh.write(b"\\1" * (400 << 10))
            time.sleep(15)
            """),
        )
    finally:
        await runner.shutdown()
    assert_refused(out)
    assert out.reason == "output exceeded result limit 1 MiB (killed)"


@pytest.mark.parametrize("out_tmpfs", [True, False], ids=["tmpfs", "plain-dir"])
async def test_a_subdirectory_in_the_output_is_refused(
    docker_client, sandbox_image: str, catalog: Catalog, tmp_path, out_tmpfs: bool
):
    """Results are files: a subdirectory (here one made unreadable, whose contents the
    size monitor of a non-root daemon could not count, nor the clean-up delete) fails the
    job naming it, on a tmpfs output or a plain directory alike."""
    if out_tmpfs and os.geteuid() != 0:
        pytest.skip("the tmpfs output mount needs a root daemon")
    runner = SandboxRunner(engine_api, sandbox_image, TEST_LIMITS,
                           tmp_path / ("tmpfs" if out_tmpfs else "plain"),
                           node=f"subdir-{out_tmpfs}-{os.getpid()}", out_tmpfs=out_tmpfs)
    try:
        out = await run_attack(runner, docker_client, catalog, dedent_script("""
            import os, time
            os.mkdir("/out/d", 0o700)
            with open("/out/d/pad", "wb") as fh:
                fh.write(b"\\1" * (100 << 10))
            time.sleep(15)
            """))
    finally:
        await runner.shutdown()
    assert_refused(out)
    assert out.reason == ("a subdirectory in the output directory (results are files) "
                          "(killed)")
