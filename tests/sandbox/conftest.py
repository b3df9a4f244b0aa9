"""Fixtures for the sandbox suite: a real Docker engine, the offline-built image, a tiny
catalog, a runner per test, and the checks that the event loop stays live during a job
(every engine call off the loop; the loop ticking while the container runs).

Without an engine these tests skip locally but FAIL under CI=true, so a CI runner that
lost its Docker socket cannot go green by skipping the whole adversarial suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from stimnet.query.fields import FieldMeta
from stimnetd.sandbox import (
    LABEL_MANAGED,
    LABEL_NODE,
    SandboxLimits,
    SandboxOutcome,
    SandboxRunner,
    job_manifest,
)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "sandbox" / "build-offline.sh"
BUILD_TIMEOUT_S = 1800
# Small, so that an attack reaches a limit soon and the suite's containers fit a small box.
TEST_LIMITS = SandboxLimits(
    memory_bytes=256 * 1024 * 1024,
    pids=64,
    cpus=1.0,
    timeout_s=20.0,
    result_bytes=1024 * 1024,
    log_bytes=64 * 1024,
    tmpfs_bytes=16 * 1024 * 1024,
)

AGES = (34, 45, 51, 58, 62, 66, 70, 73, 77, 81)
TARGETS = ("STN", "GPi", "STN", "STN", "GPi", "VIM", "STN", "GPi", "STN", "VIM")
UPDRS = (12.5, 30.0, 22.0, 41.5, 18.0, 27.0, 35.5, 9.0, 25.0, 33.0)

FIELDS = MappingProxyType(
    {
        "subject": FieldMeta("subject", "subjects", "id"),
        "age": FieldMeta("age", "subjects", "integer", bounds=(18.0, 100.0)),
        "target": FieldMeta("target", "subjects", "categorical", levels=("STN", "GPi", "VIM")),
        "updrs_change": FieldMeta("updrs_change", "outcomes", "numeric", bounds=(-60.0, 60.0)),
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here that needs the engine (its fixtures reach `docker_client`) is a
    docker test, so `-m "not docker"` runs leave the shared engine alone."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)


def _engine_or_fail() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any failure to reach the engine counts
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires a Docker engine for tests/sandbox: {exc}")
        pytest.skip(f"no Docker engine: {exc}")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    client = _engine_or_fail()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def sandbox_image(docker_client: Any) -> str:
    """Build (or reuse: the script is idempotent) the sandbox image once per session."""
    proc = subprocess.run(
        [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"sandbox/build-offline.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class Catalog:
    root: Path
    manifest: dict[str, Any]
    rows: int
    host_secret: Path


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    root = tmp_path / "catalog"
    root.mkdir()
    with open(root / "subjects.csv", "w") as fh:
        fh.write("subject,age,target\n")
        for i, (age, target) in enumerate(zip(AGES, TARGETS, strict=True)):
            fh.write(f"s{i:02d},{age},{target}\n")
    with open(root / "outcomes.csv", "w") as fh:
        fh.write("subject,updrs_change\n")
        for i, change in enumerate(UPDRS):
            fh.write(f"s{i:02d},{change}\n")
    # World-writable on purpose: a write to /data must then fail because the mount is
    # read-only, not merely because of file permissions.
    root.chmod(0o777)
    for f in root.iterdir():
        f.chmod(0o666)
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host-only\n")
    secret.chmod(0o644)
    manifest = job_manifest(
        {"subjects": "subjects.csv", "outcomes": "outcomes.csv"}, "subject", FIELDS
    )
    return Catalog(root, manifest, len(AGES), secret)


class OffLoopApi:
    """The engine's API, recording the order of its calls in `events` and the name of
    each call made on an event loop's thread in `on_loop` (such a call blocks the loop
    for an engine round trip)."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self.events: list[str] = []
        self.on_loop: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._api, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                self.on_loop.append(name)
            except RuntimeError:  # a worker thread: no loop runs here
                pass
            self.events.append(name)
            return attr(*args, **kwargs)

        return call


def engine_api() -> OffLoopApi:
    """A SandboxRunner's `docker_api` factory for the suite: the real engine, watched."""
    import docker

    return OffLoopApi(docker.from_env(timeout=120).api)


@pytest.fixture
async def runner(
    docker_client: Any, sandbox_image: str, tmp_path: Path
) -> AsyncIterator[SandboxRunner]:
    node = f"test-{uuid.uuid4().hex[:10]}"
    r = SandboxRunner(
        engine_api,
        sandbox_image,
        TEST_LIMITS,
        tmp_path / "state",
        node=node,
    )
    try:
        yield r
    finally:
        api = r._api  # noqa: SLF001 - the OffLoopApi engine_api made, if any
        await r.shutdown()
        leftovers = node_containers(docker_client, node)
        remove_containers(docker_client, leftovers)
        assert [c["Names"] for c in leftovers] == [], "containers left behind"
        assert mounts_under(tmp_path) == [], "output tmpfs mounts left behind"
        assert getattr(api, "on_loop", []) == [], "engine calls made on the event loop"


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as fh:
        targets = [line.split()[1] for line in fh]
    return [t for t in targets if t.startswith(str(path))]


def node_containers(client: Any, node: str) -> list[dict[str, Any]]:
    """This node's containers as the engine lists them (raw dicts).

    Not ``client.containers.list``: it inspects each listed container, and a container
    being created or removed at that moment makes the inspect 404.
    """
    return client.api.containers(
        all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={node}"]}
    )


def remove_containers(client: Any, containers: list[dict[str, Any]]) -> None:
    import docker.errors

    for c in containers:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.api.remove_container(c["Id"], force=True)


@dataclass
class HealthTicker:
    """Ticks every `period_s` on the test's loop, appending "tick" to `events` each time.

    `max_gap_s` (the worst gap between ticks) is a figure for bench/sandbox.py, never a
    bound in a test."""

    events: list[str] = field(default_factory=list)
    period_s: float = 0.01
    max_gap_s: float = 0.0
    ticks: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            self.max_gap_s = max(self.max_gap_s, now - last)
            self.ticks += 1
            self.events.append("tick")
            last = now

    async def __aenter__(self) -> HealthTicker:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


async def run_attack(
    runner: SandboxRunner,
    docker_client: Any,
    catalog: Catalog,
    script: str,
    job_id: str = "attack",
) -> SandboxOutcome:
    """Run `script` under a health ticker (the runner made with `engine_api`); check that
    no engine call ran on the loop, that the loop ticked between the container's start
    and its removal, and that no container of this runner survived the run."""
    api = await runner._docker()  # noqa: SLF001 - the OffLoopApi engine_api made
    assert isinstance(api, OffLoopApi)
    mark = len(api.events)
    async with HealthTicker(api.events) as health:
        outcome = await runner.run(job_id, script.encode(), catalog.root, catalog.manifest)
    assert api.on_loop == []
    assert health.ticks > 0
    events = api.events[mark:]
    started = events.index("start")
    removed = len(events) - 1 - events[::-1].index("remove_container")
    assert "tick" in events[started:removed], "the loop never ran while the container did"
    assert node_containers(docker_client, runner.node) == []
    return outcome


def assert_refused(outcome: SandboxOutcome, *statuses: str) -> None:
    """A job that released nothing: one of `statuses` ("failed" by default), no result or
    arrays, and a reason other than the success one."""
    assert outcome.status in (statuses or ("failed",)), outcome
    assert outcome.result is None
    assert outcome.arrays == {}
    assert outcome.reason not in ("", "ok")


# A script using every kind of emit the happy paths check.
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


async def wait_for(predicate: Any, what: str, *, tries: int = 400, every_s: float = 0.05) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` if it never does."""
    for _ in range(tries):
        if await predicate():
            return
        await asyncio.sleep(every_s)
    raise AssertionError(f"never happened: {what}")


def dedent_script(body: str) -> str:
    return textwrap.dedent(body).lstrip()


def logs_of(outcome: SandboxOutcome) -> str:
    return "\n".join(outcome.log_lines)


def with_limits(runner: SandboxRunner, **changes: Any) -> None:
    """Tighten one limit on the fixture's runner; limits are read per container."""
    runner._limits = replace(TEST_LIMITS, **changes)  # noqa: SLF001
