"""A full state volume: writes refused with a clear error, reads and status still served,
nothing acknowledged lost, and work resumes when space comes back."""

from __future__ import annotations

from pathlib import Path

import pytest

from stimctl.client import AsyncClient
from stimnet.errors import JobFailed, StorageFull
from tests.helpers import client_config, fill_volume

NO_SPACE = "no space left on the state volume"
QUERY = "SELECT sex, count(*), avg(age) FROM dbs_outcomes GROUP BY sex"


async def test_a_full_state_volume_refuses_writes_and_keeps_serving(start_node, pki, small_catalog,
                                                                    small_volume: Path) -> None:
    """With the entry's state volume full, a query is refused with "no space left on the
    state volume" (RESOURCE_EXHAUSTED, StorageFull), never INTERNAL; status, audit
    verification and an earlier answer are still served; once space is freed queries
    succeed again and the audit chain verifies, holding every entry acknowledged before."""
    alice, ops = pki.issue("alice", "researcher"), pki.issue("ops", "admin")
    async with start_node("node-a", catalogs=[small_catalog],
                          node={"state_dir": str(small_volume / "state")},
                          storage={"min_free_mb": 0}) as d:
        async with AsyncClient(client_config(alice, f"127.0.0.1:{d.port}", 15.0)) as c, \
                AsyncClient(client_config(ops, f"127.0.0.1:{d.port}", 30.0)) as admin:
            earlier = await c.query(QUERY)
            entries_before = (await admin.audit_verify()).entries
            filler = fill_volume(small_volume)
            # The first job finds the volume full when it writes (its share fails, saying
            # why); from then on the node refuses jobs at admission, as StorageFull.
            with pytest.raises((StorageFull, JobFailed), match=NO_SPACE):
                await c.query(QUERY)
            for _ in range(3):
                with pytest.raises(StorageFull, match=NO_SPACE):
                    await c.query(QUERY)
            assert (await admin.status()).name == "node-a"
            verified = await admin.audit_verify()
            assert verified.ok and verified.entries >= entries_before
            again = await c.result(earlier.job_id)
            assert again.rows == earlier.rows
            filler.unlink()
            after = await c.query(QUERY)
            assert after.rows
            verified = await admin.audit_verify()
            assert verified.ok and verified.entries > entries_before
