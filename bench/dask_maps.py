"""A site's voxel-map query on a 2-worker dask.distributed cluster on loopback, as a
ratio to the same query in-process, measured in the same run.

Prints the in-process and Dask wall times (median of --repeat runs after one warm-up
each) of `count_map` + weighted `mean_map` over one demo catalog (MNI 2 mm grid), and
their ratio. On one 2-core machine the workers compete with each other and with this
process for the same cores, so this measures the overhead of the path, not the scaling
a cluster of machines gives.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import ROOT, timed  # type: ignore[import-not-found]  # noqa: F401 - ROOT: puts the repo on sys.path
from distributed import LocalCluster

from stimnet.query.sql import parse_sql
from stimnetd.catalog import load_catalogs
from stimnetd.config import load_config
from stimnetd.query.engine import compute
from stimnetd.query.subjects import DaskImages
from stimnetd.testing import CertFactory, write_node_config
from tests.helpers import demo_catalog

SQL = "SELECT count_map(vta_path), mean_map(vta_path, improvement_pct) FROM dbs_outcomes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        entry = demo_catalog(Path(tmp) / "catalog", n_subjects=args.subjects, seed=5)
        certs = CertFactory(Path(tmp) / "pki").issue("node-a", "node")
        cfg = load_config(write_node_config(Path(tmp) / "site", certs, "node-a", catalogs=[entry]))
        catalog = load_catalogs(cfg.catalogs).get("dbs_outcomes")
        spec = parse_sql(SQL)
        local = timed(lambda: compute(spec, catalog), args.repeat)
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None)
        images = DaskImages(str(cluster.scheduler_address))
        try:
            dask = timed(lambda: compute(spec, catalog, images=images), args.repeat)
        finally:
            images.close()
            cluster.close()
    print(f"subjects: {args.subjects}  in-process: {local:.3f} s  2-worker Dask: {dask:.3f} s  "
          f"ratio Dask / in-process: {dask / local:.2f}")


if __name__ == "__main__":
    main()
