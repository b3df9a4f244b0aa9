"""Images decoded by the site's process pool (real worker processes): the maps equal the
dense in-process loop exactly, and a second query is served from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stimnet.query.sql import parse_sql
from stimnetd.catalog import load_catalogs
from stimnetd.catalog.imagecache import ImageCache
from stimnetd.catalog.imagereader import SparseReader
from stimnetd.config import load_config
from stimnetd.query.engine import compute
from stimnetd.query.sparse_images import CachedImages
from stimnetd.testing import CertFactory, write_node_config
from tests.helpers import demo_catalog

SQL = ("SELECT count_map(vta_path), mean_map(vta_path, improvement_pct), "
       "tmap(vta_path, improvement_pct), roi_overlap(vta_path) FROM dbs_outcomes")


def test_maps_decoded_in_the_pool_equal_the_dense_loop(tmp_path: Path) -> None:
    """Two worker processes decode the cohort's images; every array equals the dense
    path's, and the warm query decodes nothing."""
    entry = demo_catalog(tmp_path / "catalog", n_subjects=40, seed=9)
    certs = CertFactory(tmp_path / "pki").issue("node-a", "node")
    cfg = load_config(write_node_config(tmp_path / "site", certs, "node-a", catalogs=[entry]))
    catalog = load_catalogs(cfg.catalogs).get("dbs_outcomes")
    spec = parse_sql(SQL)
    dense = compute(spec, catalog).partials
    images = CachedImages(SparseReader(ImageCache(64 << 20), workers=2))
    try:
        images.reader.start()
        assert images.reader.wait_ready(300)
        for _ in range(2):
            got = compute(spec, catalog, images=images).partials
            for pd_, pg in zip(dense, got, strict=True):
                assert (pd_.kind, pd_.n, pd_.meta) == (pg.kind, pg.n, pg.meta)
                for k in pd_.stats:
                    np.testing.assert_array_equal(pg.stats[k], pd_.stats[k], strict=True)
        counters = images.reader.cache.counters
        assert counters.misses > 20 and counters.hits >= 3 * counters.misses
        assert images.reader.decoded_in_pool == counters.misses
    finally:
        images.close()
