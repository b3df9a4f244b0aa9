"""Bytes a site's store keeps per release, for a grouped voxel-map query and a table query.

One in-process daemon on the demo catalog (real store, real mTLS client), with DP off and
with `dp = "required"`. For each: the store's growth per query (pages in use, after a WAL
checkpoint: releases, cohorts, ledger, audit and the job row), and the release's partials
as stored against their packed (uncompressed, float64) size, as a ratio.
Run by bench/store.py; `python bench/store_sizes.py -n 10` alone.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sqlite3
from pathlib import Path

from _common import workdir  # type: ignore[import-not-found]

from stimctl import demodata
from stimctl.client import AsyncClient
from stimctl.client.config import ClientConfig
from stimnetd import logs
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.store import blobs
from stimnetd.testing import CertFactory, write_node_config

QUERIES = {
    "grouped mean map": "SELECT sex, mean_map(vta_path, improvement_pct) AS m "
                        "FROM dbs_outcomes GROUP BY sex",
    "table query": "SELECT sex, count(*), avg(age), avg(improvement_pct) "
                   "FROM dbs_outcomes GROUP BY sex",
}


def used_bytes(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
    finally:
        conn.close()
    return int((pages - free) * size)


def partial_sizes(db: Path, job_ids: list[str]) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        raw = stored = 0
        for jid in job_ids:
            (blob,) = conn.execute("SELECT partials FROM releases WHERE job_id = ?",
                                   (jid,)).fetchone()
            stored += len(blob)
            raw += len(blobs.expand(blob) or b"")
    finally:
        conn.close()
    return raw, stored


async def measure(tmp: Path, dp: str, n: int) -> None:
    pki = CertFactory(tmp / f"pki-{dp}")
    root = tmp / f"catalog-{dp}"
    entry = demodata.generate_site(root, site="site-a", site_index=0, n_subjects=60, seed=3)
    certs = pki.issue("node-a", "node")
    path = write_node_config(tmp / f"node-{dp}", certs, "node-a", crl=pki.crl_path,
                             catalogs=[{**entry, "root": str(root)}],
                             privacy={"dp": dp, "budget_epsilon": 1e6,
                                      "max_epsilon_per_query": 10.0},
                             gossip={"enabled": False})
    daemon = Daemon(load_config(path))
    await daemon.start()
    alice = pki.issue("alice", "researcher")
    cfg = ClientConfig(address=f"127.0.0.1:{daemon.port}", ca=alice.ca, cert=alice.cert,
                       key=alice.key, timeout_s=120.0)
    db = daemon.config.node.state_dir / "stimnetd.sqlite3"
    try:
        async with AsyncClient(cfg) as c:
            for label, sql in QUERIES.items():
                await c.query(sql)  # warm-up: first-use rows (site secret, ledger)
                before = used_bytes(db)
                ids = [(await c.query(sql)).job_id for _ in range(n)]
                grown = (used_bytes(db) - before) / n
                raw, stored = partial_sizes(db, ids)
                print(f"dp={dp:8} {label:17}: store +{grown / 1024:8.1f} KiB per release; "
                      f"partials {raw / n / 1024:9.1f} KiB packed -> {stored / n / 1024:8.1f} "
                      f"KiB stored (ratio {stored / raw:.4f})")
    finally:
        await daemon.shutdown()


async def main(n: int) -> None:
    logs.configure("warning", stream=io.StringIO())
    tmp = workdir()
    for dp in ("off", "required"):
        await measure(tmp, dp, n)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10, help="queries of each kind")
    asyncio.run(main(ap.parse_args().n))
