"""The store grows by little per answer, and refuses to grow past its limits."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from stimctl.client import AsyncClient
from stimnet.errors import AnswerTooLarge, StorageFull, StorageQuotaExceeded
from tests.helpers import client_config

MAP_QUERY = "SELECT sex, mean_map(vta_path, improvement_pct) AS m FROM dbs_outcomes GROUP BY sex"
# Queries in the burst test; STIMNET_STORE_BURST=500 runs the issue's full burst.
BURST = int(os.environ.get("STIMNET_STORE_BURST", "25"))
# The stated bound: a grouped mean map on the demo's 2 mm grid (902,629 voxels, two
# groups, sum and count arrays: 29 MB as float64) is stored in at most this much. Arrays
# travel and are stored sparse (stimnet/codec.py): about 6 kB per query here, job row,
# release and audit entries included.
MAX_BYTES_PER_MAP_RELEASE = 64 * 1024


def _store_bytes(state: Path) -> int:
    conn = sqlite3.connect(state / "stimnetd.sqlite3")
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    return (pages - free) * size


async def test_a_burst_of_map_queries_keeps_the_store_small(start_node, pki, small_catalog,
                                                            tmp_path: Path) -> None:
    """Each released grouped mean map (29 MB of float64 arrays) grows the site's store by at
    most MAX_BYTES_PER_MAP_RELEASE, over a burst of BURST queries; the answers come back whole."""
    alice = pki.issue("alice", "researcher")
    async with start_node("node-a", catalogs=[small_catalog],
                          privacy={"dp": "off"}) as d:
        state = d.config.node.state_dir
        before = _store_bytes(state)
        async with AsyncClient(client_config(alice, f"127.0.0.1:{d.port}", 120.0)) as c:
            first = await c.query(MAP_QUERY)
            for _ in range(BURST - 1):
                last = await c.query(MAP_QUERY)
            again = await c.result(last.job_id)
        grown = _store_bytes(state) - before
    print(f"store grew {grown} bytes over {BURST} map queries: {grown / BURST:.0f} per query")
    assert grown <= BURST * MAX_BYTES_PER_MAP_RELEASE, grown / BURST
    for group in ({"sex": "F"}, {"sex": "M"}):
        a, b = first.map_array("m", group=group), again.map_array("m", group=group)
        assert a.shape == (91, 109, 91) and np.count_nonzero(a) > 0
        np.testing.assert_array_equal(a, b)


async def test_a_researcher_at_the_stored_answer_quota_is_refused(start_node, pki,
                                                                  small_catalog) -> None:
    """Past `max_stored_mb_per_researcher` a researcher's next query is refused with the
    limit named, and nothing is stored for it; another researcher is not affected."""
    alice, bob = pki.issue("alice", "researcher"), pki.issue("bob", "researcher")
    async with start_node("node-a", catalogs=[small_catalog], privacy={"dp": "off"},
                          storage={"max_stored_mb_per_researcher": 0.001}) as d:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{d.port}", 60.0)) as c:
            await c.query(MAP_QUERY)  # ~1.4 kB stored (sparse, compressed): over the 1 kB quota
            # The job's answer is committed with its final state, after the client has it.
            for _ in range(200):
                await d.store.flush()
                rows = await d.store.db.execute_fetchall(
                    "SELECT count(*) FROM jobs WHERE owner = 'alice' AND result IS NOT NULL")
                if list(rows)[0][0]:
                    break
                await asyncio.sleep(0.05)
            stored = await d.store.stored_bytes("alice")
            with pytest.raises(StorageQuotaExceeded, match="max_stored_mb_per_researcher = 0.001"):
                await c.query(MAP_QUERY)
            assert await d.store.stored_bytes("alice") == stored
        async with AsyncClient(client_config(bob, f"127.0.0.1:{d.port}", 60.0)) as c:
            assert (await c.query("SELECT count(*) FROM dbs_outcomes")).rows


async def test_below_the_free_space_floor_new_jobs_are_refused(start_node, pki,
                                                               small_catalog) -> None:
    """With less free space than `min_free_mb`, a query is refused as StorageFull naming the
    setting, while status and audit verification still answer."""
    alice, ops = pki.issue("alice", "researcher"), pki.issue("ops", "admin")
    async with start_node("node-a", catalogs=[small_catalog],
                          storage={"min_free_mb": 1e9}) as d:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{d.port}", 30.0)) as c:
            with pytest.raises(StorageFull, match="min_free_mb = 1e"):
                await c.query("SELECT count(*) FROM dbs_outcomes")
        async with AsyncClient(client_config(ops, f"127.0.0.1:{d.port}", 30.0)) as c:
            assert (await c.status()).name == "node-a"
            assert (await c.audit_verify()).ok


async def test_a_query_planned_over_max_answer_mb_is_refused_before_compute(
        start_node, pki, small_catalog) -> None:
    """The grouped mean map plans 2 groups × 2 float64 grids (29 MiB): over a 20 MiB
    `max_answer_mb` it is refused at once, naming the limit, and nothing is stored; the
    same map without the grouping (15 MiB) is answered."""
    alice = pki.issue("alice", "researcher")
    async with start_node("node-a", catalogs=[small_catalog], privacy={"dp": "off"},
                          storage={"max_answer_mb": 20}) as d:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{d.port}", 60.0)) as c:
            with pytest.raises(AnswerTooLarge, match=r"2 groups × 1 map\(s\): 29 MiB .*"
                                                     r"\[storage\] max_answer_mb = 20"):
                await c.query(MAP_QUERY)
            await d.store.flush()
            assert await d.store.stored_bytes("alice") == 0
            whole = await c.query("SELECT mean_map(vta_path, improvement_pct) AS m "
                                  "FROM dbs_outcomes")
            assert np.count_nonzero(whole.map_array("m")) > 0
