"""Fixtures for the sandbox suite: a real Docker engine, the offline-built image, a tiny
catalog, a runner per test, and a health ticker that proves the event loop stays live.

Without an engine these tests skip locally but FAIL under CI=true, so a CI runner that
lost its Docker socket cannot go green by skipping the whole adversarial suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from stimnet.query.fields import FieldMeta
from stimnetd.sandbox.runner import (
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
# Small enough that the attack tests finish in seconds on a 2-core CI box.
TEST_LIMITS = SandboxLimits(
    memory_bytes=256 * 1024 * 1024,
    pids=64,
    cpus=1.0,
    timeout_s=20.0,
    result_bytes=1024 * 1024,
    log_bytes=64 * 1024,
    tmpfs_bytes=16 * 1024 * 1024,
)
MAX_LOOP_STALL_S = 1.0

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


@pytest.fixture
async def runner(
    docker_client: Any, sandbox_image: str, tmp_path: Path
) -> AsyncIterator[SandboxRunner]:
    import docker

    node = f"test-{uuid.uuid4().hex[:10]}"
    r = SandboxRunner(
        lambda: docker.from_env(timeout=120),
        sandbox_image,
        TEST_LIMITS,
        tmp_path / "state",
        node=node,
    )
    try:
        yield r
    finally:
        await r.shutdown()
        leftovers = node_containers(docker_client, node)
        remove_containers(docker_client, leftovers)
        assert not leftovers, f"containers left behind: {[c['Names'] for c in leftovers]}"
        assert mounts_under(tmp_path) == [], "output tmpfs mounts left behind"


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
    """Ticks every 50 ms on the test's loop and records the worst gap between ticks."""

    period_s: float = 0.05
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
    """Run `script` under a health ticker; check the loop never stalled and no container
    of this runner survived the run."""
    async with HealthTicker() as health:
        outcome = await runner.run(job_id, script.encode(), catalog.root, catalog.manifest)
    assert health.ticks > 0
    assert health.max_gap_s < MAX_LOOP_STALL_S, f"event loop stalled {health.max_gap_s:.2f} s"
    assert node_containers(docker_client, runner.node) == []
    return outcome


def assert_refused(outcome: SandboxOutcome, *statuses: str) -> None:
    assert outcome.status in (statuses or ("failed",)), outcome
    assert outcome.result is None
    assert outcome.arrays == {}
    assert outcome.reason and outcome.reason != "ok"
