"""Script jobs under differential privacy, through a real daemon and a real Docker engine:
sample-and-aggregate (privacy/blocks.py) releases a noisy mean of the blocks' clamped
outputs, charges its ε, and lets nothing per block out, whatever the script does.

False alarms: each statistical assertion below fails by chance with probability at most
1e-3 (stated where it is made), so the file as a whole at most about 3e-3.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stimctl.client import AsyncClient, Refused
from stimnetd.privacy.blocks import assign
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

NODE = f"saa-node-{os.getpid()}"
AGES = [float(20 + (i * 37) % 60) for i in range(100)]  # 100 subjects, ages 20..79
BLOCKS = 10  # 100 subjects, 10 per block
LO, HI = 0.0, 100.0
TARGET = "p007"  # the subject the attacker is after
MEAN_AGE = b"""
from stimnet_runtime import load_table, emit_mean
df = load_table("s")
emit_mean("mean_age", "age", df["age"])
"""
MEAN_OUT = f"SELECT clamp(avg(age), {LO:g}, {HI:g}) AS mean_age FROM tiny"
# A block's count is its estimate of the cohort's (B times its own), so the blocks' mean is
# the cohort's size exactly when each block sees its own rows only, B times it otherwise.
MEAN_COUNT = MEAN_AGE + b'from stimnet_runtime import emit_count\nemit_count("n", len(df))\n'
MEAN_COUNT_OUT = (f"SELECT clamp(avg(age), {LO:g}, {HI:g}) AS mean_age, "
                  "clamp(count(*), 0, 1000) AS n FROM tiny")
# The strongest attack on one subject a declared mean allows: the block holding the target
# reports the target's exact age, every other block the range's midpoint, so the release
# is midpoint + (age - midpoint) / B + noise. (Writing result.json by hand, past the
# runtime's clamping: the daemon trusts nothing the runtime does.)
LEAK = f"""
import json, sys
from stimnet_runtime import load_table
df = load_table("s")
row = df[df["sid"] == "{TARGET}"]
value = float(row["age"].iloc[0]) if len(row) else 50.0
doc = {{"version": 1, "aggregates": [{{"kind": "moments", "name": "mean_age", "n": 1,
       "stats": {{"n": [1], "s1": [value], "s2": [value * value]}},
       "meta": {{"field": "age", "stat": "mean"}}}}]}}
open("/out/result.json", "w").write(json.dumps(doc))
""".encode()
# Fails in ways a script controls, differently per block: an exception naming a secret at
# one line, an exit status, a log line.
FAILING = f"""
import sys
from stimnet_runtime import load_table
df = load_table("s")
print("LEAKED-LOG-LINE", len(df))
if "{TARGET}" in set(df["sid"]):
    raise ValueError("secret-{TARGET}-is-here")
sys.exit(42)
""".encode()


def _config(tmp: Path, pki: CertFactory, **privacy: Any) -> tuple[Path, int]:
    port = free_port()
    cat = _tiny_catalog(tmp / "data", AGES)
    cfg = write_node_config(tmp / "node", pki.issue(NODE, "node"), NODE, port=port,
                            catalogs=[cat], crl=pki.crl_path, gossip={"enabled": False},
                            scripts={"policy": "auto", "memory_mb": 256, "timeout_s": 20,
                                     "warm_containers": 0, "log_policy": "full",
                                     "release_slot_s": 1},
                            privacy={"dp": "required", "budget_epsilon": 1000.0,
                                     "max_epsilon_per_query": 50.0, **privacy})
    return cfg, port


@contextlib.asynccontextmanager
async def _node(tmp: Path, pki: CertFactory, **privacy: Any) -> AsyncIterator[AsyncClient]:
    cfg, port = _config(tmp, pki, **privacy)
    proc = DaemonProcess(cfg)
    alice = pki.issue("alice", "researcher")
    addr = f"127.0.0.1:{port}"
    try:
        await proc.wait_healthy(alice, addr)
        async with AsyncClient(client_config(alice, addr, 120)) as c:
            yield c
    finally:
        assert proc.stop() == 0


def _state(tmp: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp / "node" / "state" / "stimnetd.sqlite3")


def _block_means(tmp: Path) -> list[float]:
    """Each block's mean age, from the site's own secret and split (privacy/blocks.assign)."""
    with _state(tmp) as db:
        secret = bytes(db.execute("SELECT value FROM meta WHERE key = 'site_secret'").fetchone()[0])
    ids = [f"p{i:03d}" for i in range(len(AGES))]
    groups = assign(sorted(ids), secret + b"\0blocks\0tiny", BLOCKS)
    return [float(np.mean([AGES[int(s[1:])] for s in g])) if g else (LO + HI) / 2
            for g in groups]


def _laplace_bound(scale: float, alpha: float) -> float:
    """|Laplace(scale)| exceeds this with probability alpha."""
    return scale * math.log(1 / alpha)


async def test_released_mean_is_the_noisy_mean_of_the_blocks(tmp_path: Path, pki: CertFactory,
                                                             sandbox_image: str) -> None:
    """The release is the mean of the blocks' means plus Laplace noise of scale
    (hi - lo) / (B·ε/2) (ε split over two outputs), near the pooled mean; each block saw
    its own rows only (the count is the cohort's, not B times it); ε (δ = 0) is charged."""
    # Prepare
    epsilon = 20.0
    async with _node(tmp_path, pki) as c:
        # Execute
        ans = await c.run_job(await c.submit_script(MEAN_COUNT, "tiny", outputs=MEAN_COUNT_OUT,
                                                    epsilon=epsilon))
    # Assert: |noise| > scale·ln(2000) has probability 5e-4, so either of the two 1e-3.
    released, count = ans.rows[0]
    expected = float(np.mean(_block_means(tmp_path)))
    assert abs(released - expected) <= _laplace_bound((HI - LO) / (BLOCKS * epsilon / 2), 5e-4)
    assert abs(expected - float(np.mean(AGES))) < 2.0  # blocks of 10: their means' mean
    assert abs(count - len(AGES)) <= _laplace_bound(1000 / (BLOCKS * epsilon / 2), 5e-4)
    assert [(p["epsilon"], p["delta"]) for p in ans.privacy] == [(epsilon, None)]
    with _state(tmp_path) as db:
        charged = db.execute("SELECT epsilon FROM ledger").fetchall()
    assert charged == [(epsilon,)]


async def test_an_attackers_estimate_of_one_subject_is_as_poor_as_dp_says(
        tmp_path: Path, pki: CertFactory, sandbox_image: str) -> None:
    """A script that reports one subject's exact age from its block: the attacker's best
    estimate, midpoint + B·(release - midpoint), is off by Laplace noise of scale
    (hi - lo)/ε, the bound ε-DP sets; with no clamping it would be exact."""
    # Prepare
    epsilon, runs = 5.0, 3
    target_age = AGES[int(TARGET[1:])]
    mid = (LO + HI) / 2
    async with _node(tmp_path, pki) as c:
        # Execute
        errors = []
        for _ in range(runs):
            ans = await c.run_job(await c.submit_script(LEAK, "tiny", outputs=MEAN_OUT,
                                                        epsilon=epsilon))
            errors.append(abs(mid + BLOCKS * (ans.rows[0][0] - mid) - target_age))
    # Assert: each error is |Laplace((hi - lo)/ε)| = |Laplace(20)| (clamping the release to
    # [lo, hi] is ~25 scales away). All `runs` of them below t has probability
    # (1 - exp(-t/20))^3 = 1e-3 at t = 2.1 years.
    t = -(HI - LO) / epsilon * math.log(1 - 1e-3 ** (1 / runs))
    assert max(errors) >= t, errors


async def test_no_block_failure_detail_reaches_the_researcher(tmp_path: Path, pki: CertFactory,
                                                              sandbox_image: str) -> None:
    """Blocks that raise (naming a secret), exit 42 and print logs, under log_policy "full":
    the job succeeds with every block counted at the range's midpoint, and neither its
    detail, its events nor its answer carry an exception, a status or a log line."""
    # Prepare
    events: list[Any] = []
    async with _node(tmp_path, pki) as c:
        # Execute
        job = await c.submit_script(FAILING, "tiny", outputs=MEAN_OUT, epsilon=20.0)
        ans = await c.run_job(job, on_event=lambda kind, value: events.append((kind, value)))
        final = await c.get_job(job.id)
    # Assert: every block counts as 50; |noise| > 0.5·ln(1000) has probability 1e-3.
    assert final.state == "succeeded"
    assert abs(ans.rows[0][0] - (LO + HI) / 2) <= _laplace_bound((HI - LO) / (BLOCKS * 20.0),
                                                                1e-3)
    shown = " ".join([final.detail, str(events), str(ans.doc)])
    for leak in ("LEAKED-LOG-LINE", "secret-", "ValueError", "status 42", "exited", "raised"):
        assert leak not in shown, leak


async def test_a_script_job_without_ranges_is_refused_under_dp(tmp_path: Path, pki: CertFactory,
                                                              sandbox_image: str) -> None:
    """Under dp required a declared output without a range is refused before anything runs,
    naming the output and the clamp() syntax."""
    async with _node(tmp_path, pki) as c:
        with pytest.raises(Refused) as exc:
            await c.submit_script(MEAN_AGE, "tiny", outputs="SELECT avg(age) AS mean_age FROM tiny")
    assert exc.value.args[0] == (
        "under differential privacy each declared output of a script needs a range its value "
        "is clamped to (sample-and-aggregate); none for 'mean_age': declare it with clamp(), "
        "e.g. --outputs \"SELECT clamp(avg(age), 18, 100) AS mean_age FROM tiny\"")
