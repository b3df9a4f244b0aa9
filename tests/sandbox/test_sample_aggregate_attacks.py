"""Issue 21's attacks on declared outputs, run again under dp required through a real
daemon and real Docker (the harness of test_sample_aggregate.py): digits written into
declared counts, one value repeated in a declared mean, and the k_min mask. Each time the
attacker knows every subject but the target (DP's threat model), so its best estimate is
the release minus what the other blocks contribute, and that estimate must be no better
than the Laplace noise ε-DP sets for the ε charged.

Each test checks two things: the release is within the noise's 1 − 5e-4 bound of what the
script's blocks made (so the expectation is the right one), and the attacker's errors are
not all below the level they fall under with probability 1e-3. False alarms: at most
about 1.5e-3 per test (stated where each is made).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stimctl.client import AsyncClient
from stimnetd.privacy.blocks import assign
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

from .test_sample_aggregate import AGES, BLOCKS, HI, LO, TARGET, _laplace_bound, _state

pytestmark = pytest.mark.docker

NODE = f"sbx-saa-attacks-{os.getpid()}"
TARGET_AGE = int(AGES[int(TARGET[1:])])
MID = (LO + HI) / 2


@contextlib.asynccontextmanager
async def _node(tmp: Path, pki: CertFactory) -> AsyncIterator[AsyncClient]:
    port = free_port()
    cfg = write_node_config(tmp / "node", pki.issue(NODE, "node"), NODE, port=port,
                            catalogs=[_tiny_catalog(tmp / "data", AGES)], crl=pki.crl_path,
                            gossip={"enabled": False},
                            scripts={"policy": "auto", "memory_mb": 256, "timeout_s": 20,
                                     "warm_containers": 0, "release_slot_s": 0},
                            privacy={"dp": "required", "budget_epsilon": 1000.0,
                                     "max_epsilon_per_query": 50.0})
    proc = DaemonProcess(cfg)
    alice = pki.issue("alice", "researcher")
    addr = f"127.0.0.1:{port}"
    try:
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 300)) as c:
            yield c
    finally:
        assert proc.stop() == 0


def _blocks(tmp: Path) -> list[list[int]]:
    """Each block's subjects (indices into AGES), from the site's own secret and split."""
    with _state(tmp) as db:
        secret = bytes(db.execute("SELECT value FROM meta WHERE key = 'site_secret'").fetchone()[0])
    ids = sorted(f"p{i:03d}" for i in range(len(AGES)))
    return [[int(s[1:]) for s in g] for g in assign(ids, secret + b"\0blocks\0tiny", BLOCKS)]


def _expected(blocks: Sequence[list[int]], value: Callable[[list[int]], float | None]) -> float:
    """The release before noise: the mean of the blocks' values clamped to [LO, HI], a
    block with none (it emitted nothing usable) at the midpoint."""
    return float(np.mean([min(HI, max(LO, MID if (v := value(b)) is None else v))
                          for b in blocks]))


def _all_below(scale: float, samples: int, alpha: float = 1e-3) -> float:
    """t with P(all `samples` |Laplace(scale)| < t) = alpha."""
    return -scale * math.log(1 - alpha ** (1 / samples))


def _digits(age: int) -> list[int]:
    return [age % 7, age // 7 % 7, age // 49 % 7]


# Three declared counts, each carrying one base-7 digit of the target's age from the block
# holding it; every other block reports 5 (a block's count may not exceed its rows, so
# the digits ride on top of an offset the attacker knows).
DIGITS = f"""
from stimnet_runtime import load_table, emit_count
df = load_table("s")
row = df[df["sid"] == "{TARGET}"]
digits = [0, 0, 0]
if len(row):
    age = int(row["age"].iloc[0])
    digits = [age % 7, age // 7 % 7, age // 49 % 7]
for i in range(3):
    emit_count(f"d{{i}}", min(len(df), digits[i] if len(row) else 5))
""".encode()
DIGITS_OUT = ("SELECT " + ", ".join(f"clamp(count(*), {LO:g}, {HI:g}) AS d{i}" for i in range(3))
              + " FROM tiny")


async def test_digits_written_into_declared_counts_come_back_as_noisy_as_dp_says(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """Base-7 digits of one subject's age in three declared counts (exact before: the three
    digits came back as written): each digit's estimate is off by the rounded Laplace
    noise of scale (hi - lo) / (B·ε/3), which a release at ε = 15 cannot beat."""
    # Prepare
    epsilon, runs = 15.0, 2
    async with _node(tmp_path, pki) as c:
        # Execute
        answers = [await c.run_job(await c.submit_script(DIGITS, "tiny", outputs=DIGITS_OUT,
                                                         epsilon=epsilon)) for _ in range(runs)]
    blocks = _blocks(tmp_path)
    scale = (HI - LO) / (BLOCKS * epsilon / 3)
    errors = []
    for ans in answers:
        for i, digit in enumerate(_digits(TARGET_AGE)):
            expected = _expected(blocks, lambda b, i=i, digit=digit: (
                float(min(len(b), digit if int(TARGET[1:]) in b else 5)) * BLOCKS))
            # Assert: within the noise of the blocks' mean (each of 6 at 1 - 5e-4, plus 1
            # for the count's rounding) ...
            assert abs(ans.rows[0][i] - expected) <= _laplace_bound(scale, 5e-4 / 6) + 1
            errors.append(abs(ans.rows[0][i] - expected))
    # ... and the attacker's digit errors are |round(Laplace(2))|: all six 0 (every digit
    # read exactly) has probability (1 - exp(-0.5/2))^6 = 1.2e-4.
    assert max(errors) >= 1, errors


# Every row of the target's block replaced by the target's age (the original attack
# repeated it 60 times; a block's n may not exceed its rows, so it repeats it len(df)
# times); every other block reports its honest mean.
REPEAT = f"""
from stimnet_runtime import load_table, emit_mean
df = load_table("s")
row = df[df["sid"] == "{TARGET}"]
values = [float(row["age"].iloc[0])] * len(df) if len(row) else df["age"]
emit_mean("m", "age", values)
""".encode()
MEAN_OUT = f"SELECT clamp(avg(age), {LO:g}, {HI:g}) AS m FROM tiny"


async def test_a_value_repeated_in_a_declared_mean_is_as_noisy_as_dp_says(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """The target's age repeated over its block (before: back within about ±1): the
    attacker's estimate B·release − Σ other blocks' means is off by Laplace((hi − lo)/ε)."""
    # Prepare
    epsilon, runs = 5.0, 3
    async with _node(tmp_path, pki) as c:
        # Execute
        releases = [(await c.run_job(await c.submit_script(REPEAT, "tiny", outputs=MEAN_OUT,
                                                           epsilon=epsilon))).rows[0][0]
                    for _ in range(runs)]
    blocks = _blocks(tmp_path)
    target = int(TARGET[1:])

    def block_mean(b: list[int]) -> float | None:
        return float(TARGET_AGE) if target in b else (
            float(np.mean([AGES[i] for i in b])) if b else None)

    expected = _expected(blocks, block_mean)
    others = sum(min(HI, max(LO, MID if (v := block_mean(b)) is None else v))
                 for b in blocks if target not in b)
    # Assert: each release within 1 - 5e-4/3 of the blocks' mean ...
    scale = (HI - LO) / (BLOCKS * epsilon)
    assert all(abs(r - expected) <= _laplace_bound(scale, 5e-4 / runs) for r in releases)
    # ... and the attacker's three errors, each |Laplace(20)|, all below t with
    # probability 1e-3.
    errors = [abs(BLOCKS * r - others - TARGET_AGE) for r in releases]
    assert max(errors) >= _all_below((HI - LO) / epsilon, runs), errors


# The k_min mask: one bit of the target's age per declared group, written as a count of 3
# (set) or 0 (clear) from the target's block, 1 from every other block. Under k_min these
# small counts were withheld or not by the bit; the mask carried them exactly.
BITS = f"""
from stimnet_runtime import load_table, emit_count
df = load_table("s")
row = df[df["sid"] == "{TARGET}"]
for g, level in enumerate(("PD", "ET", "dystonia")):
    if len(row):
        n = 3 * ((int(row["age"].iloc[0]) >> (g + 3)) & 1)
    else:
        n = 1
    emit_count("n", min(n, len(df) // 3), group={{"diagnosis": level}})
""".encode()
BITS_OUT = f"SELECT clamp(count(*), {LO:g}, {HI:g}) AS n FROM tiny GROUP BY diagnosis"


async def test_the_k_min_mask_carries_nothing_and_the_counts_are_as_noisy_as_dp_says(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """Counts far below k_min in some groups and not others: every group is released
    (nothing is withheld, so which were small says nothing), and each bit's count is off by
    the rounded Laplace noise of scale (hi − lo)/(B·ε/3)."""
    # Prepare
    epsilon, runs = 15.0, 2
    async with _node(tmp_path, pki) as c:
        # Execute
        answers = [await c.run_job(await c.submit_script(BITS, "tiny", outputs=BITS_OUT,
                                                         epsilon=epsilon)) for _ in range(runs)]
    blocks = _blocks(tmp_path)
    target = int(TARGET[1:])
    scale = (HI - LO) / (BLOCKS * epsilon / 3)
    errors = []
    for ans in answers:
        # Assert: all three groups released, none withheld or noted.
        rows: dict[Any, Any] = {r[0]: r[1] for r in ans.rows}
        assert sorted(rows) == ["ET", "PD", "dystonia"] and None not in rows.values(), ans.rows
        assert ans.notes == []
        for g, level in enumerate(("PD", "ET", "dystonia")):
            bit = (TARGET_AGE >> (g + 3)) & 1
            expected = _expected(blocks, lambda b, bit=bit: float(
                min(3 * bit if target in b else 1, len(b) // 3)) * BLOCKS)
            assert abs(rows[level] - expected) <= _laplace_bound(scale, 5e-4 / 6) + 1
            errors.append(abs(rows[level] - expected))
    # ... each error |round(Laplace(2))|: all six 0 has probability 1.2e-4.
    assert max(errors) >= 1, errors
