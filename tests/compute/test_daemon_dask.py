"""A daemon with `[compute] scheduler` answers a researcher's map query through the Dask
cluster (real scheduler and workers on loopback, real daemon with mTLS): the same map as
a daemon computing in-process, and the cluster ran the chunk tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

from stimctl import Client as StimnetClient
from tests.helpers import client_config

SQL = "SELECT count_map(vta_path) AS c, mean_map(vta_path, improvement_pct) AS m FROM dbs_outcomes"


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None)
    try:
        yield str(cluster.scheduler_address)
    finally:
        cluster.close()


async def test_a_daemon_with_a_scheduler_answers_maps_through_the_cluster(
        start_node, pki, small_catalog, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    """Both daemons answer the same count and mean maps; the Dask one ran chunk tasks."""
    alice = pki.issue("alice", "researcher")

    def ask(port: int) -> tuple[np.ndarray, np.ndarray]:
        c = StimnetClient(client_config(alice, f"127.0.0.1:{port}"))
        try:
            ans = c.query(SQL)
            return (np.asarray(ans.to_nifti("c").dataobj), np.asarray(ans.to_nifti("m").dataobj))
        finally:
            c.close()

    async with start_node("node-a", catalogs=[small_catalog], privacy={"dp": "off"}) as local:
        expected = await asyncio.to_thread(ask, local.port)
    watcher = Client(scheduler, set_as_default=False)
    try:
        async with start_node("node-b", catalogs=[small_catalog], privacy={"dp": "off"},
                              compute={"scheduler": scheduler}) as remote:
            with get_task_stream(client=watcher) as stream:
                got = await asyncio.to_thread(ask, remote.port)
    finally:
        watcher.close()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)
    assert np.nanmax(expected[0]) > 0  # voxels under k_min are withheld (NaN) alike
    assert any(str(t["key"]).startswith("chunk_sums-") for t in stream.data)
