"""Voxel maps built from the sparse image cache equal the dense in-process loop exactly
(counts and float sums alike), judge the catalog's contract with the same errors, read
each image once across a query's aggregates, and follow a file that changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stimnet.errors import DataContractViolation
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
       "mean_map(vta_path), tmap(vta_path, improvement_pct), "
       "tmap2(vta_path, improvement_pct), "
       "prop_map(vta_path, improvement_pct > 50), roi_overlap(vta_path) FROM dbs_outcomes")


def _catalog(tmp: Path, n: int = 30):  # type: ignore[no-untyped-def]
    entry = demo_catalog(tmp / "catalog", n_subjects=n, seed=5)
    certs = CertFactory(tmp / "pki").issue("node-a", "node")
    cfg = load_config(write_node_config(tmp / "site", certs, "node-a", catalogs=[entry]))
    return load_catalogs(cfg.catalogs).get("dbs_outcomes")


def _images(tmp: Path | None = None) -> CachedImages:
    return CachedImages(SparseReader(ImageCache(64 << 20, tmp, 64 << 20), workers=0))


def _same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert [(p.kind, p.n, p.meta, p.group) for p in a] == [(p.kind, p.n, p.meta, p.group)
                                                          for p in b]
    for pa, pb in zip(a, b, strict=True):
        assert set(pa.stats) == set(pb.stats)
        for k in pa.stats:
            np.testing.assert_array_equal(pa.stats[k], pb.stats[k], strict=True)


def test_cached_maps_equal_the_dense_loop_exactly(tmp_path: Path) -> None:
    """Every map aggregate, cold then warm (each image decoded once for all of them):
    the same arrays bit for bit as the dense loop."""
    catalog = _catalog(tmp_path)
    spec = parse_sql(SQL)
    dense = compute(spec, catalog).partials
    images = _images()
    cold = compute(spec, catalog, images=images).partials
    counters = images.reader.cache.counters
    assert counters.misses == catalog.n_subjects - int(catalog.frame()["vta_path"].isna().sum())
    warm = compute(spec, catalog, images=images).partials
    assert counters.misses == catalog.n_subjects - int(catalog.frame()["vta_path"].isna().sum())
    assert dense[0].stats["count"].max() > 1 and dense[-1].stats["n"].max() > 0
    _same(cold, dense)
    _same(warm, dense)


def test_grouped_and_filtered_maps_equal_the_dense_loop(tmp_path: Path) -> None:
    """With WHERE and GROUP BY the cached path answers each group as the dense one."""
    catalog = _catalog(tmp_path)
    spec = parse_sql("SELECT count_map(vta_path), tmap(vta_path, improvement_pct) "
                     "FROM dbs_outcomes WHERE age > 40 GROUP BY sex")
    _same(compute(spec, catalog, images=_images()).partials, compute(spec, catalog).partials)


def test_a_changed_image_is_decoded_again(tmp_path: Path) -> None:
    """After a file is rewritten, the next map reads the new image (disk entries too)."""
    catalog = _catalog(tmp_path)
    spec = parse_sql("SELECT count_map(vta_path) FROM dbs_outcomes")
    images = _images(tmp_path / "cache")
    compute(spec, catalog, images=images)
    rel = catalog.frame()["vta_path"].dropna().iloc[0]
    path = catalog.root / rel
    img = nib.load(path)
    grown = np.asarray(img.dataobj).copy()
    grown[10:14, 10:14, 10:14] = 1
    nib.save(nib.Nifti1Image(grown, img.affine, img.header), path)
    again = _images(tmp_path / "cache")  # a restarted daemon: the disk entry is stale too
    _same(compute(spec, catalog, images=again).partials, compute(spec, catalog).partials)
    _same(compute(spec, catalog, images=images).partials, compute(spec, catalog).partials)


def test_the_catalogs_contract_is_judged_alike(tmp_path: Path) -> None:
    """max_voxels too small: the cached path refuses with the dense path's message."""
    catalog = _catalog(tmp_path)
    field = catalog.fields["vta_path"]
    catalog.fields["vta_path"] = dataclasses.replace(field, max_voxels=1)
    spec = parse_sql("SELECT count_map(vta_path) FROM dbs_outcomes")
    with pytest.raises(DataContractViolation) as dense:
        compute(spec, catalog)
    with pytest.raises(DataContractViolation) as cached:
        compute(spec, catalog, images=_images())
    assert str(cached.value) == str(dense.value)


@pytest.mark.parametrize("clamp", [False, True])
def test_continuous_maps_equal_the_dense_loop_exactly(tmp_path: Path, clamp: bool) -> None:
    """corr_map and mean_map of float32 E-fields, with and without clamping to the
    value bounds: the cached sums equal the dense path's bit for bit."""
    from tests.federation.test_corr_map import _site

    cat, _df, _x = _site(tmp_path / "ef", 0, np.random.default_rng(8))
    certs = CertFactory(tmp_path / "pki").issue("node-a", "node")
    cfg = load_config(write_node_config(tmp_path / "site", certs, "node-a", catalogs=[cat]))
    catalog = load_catalogs(cfg.catalogs).get("ef")
    spec = parse_sql("SELECT corr_map(efield, outcome), mean_map(efield) FROM ef")
    dense = compute(spec, catalog, clamp=clamp).partials
    assert dense[0].stats["sxw"].any()
    _same(compute(spec, catalog, images=_images(), clamp=clamp).partials, dense)


def test_without_a_process_pool_images_are_decoded_on_the_querys_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine where the pool cannot start (no semaphores) still answers, equal to the
    dense loop, and stops trying the pool."""
    import stimnetd.catalog.imagereader as imagereader

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError("no /dev/shm")

    monkeypatch.setattr(imagereader, "ProcessPoolExecutor", refuse)
    catalog = _catalog(tmp_path, n=12)
    spec = parse_sql("SELECT count_map(vta_path), tmap(vta_path, improvement_pct) "
                     "FROM dbs_outcomes")
    images = CachedImages(SparseReader(ImageCache(64 << 20), workers=2))
    _same(compute(spec, catalog, images=images).partials, compute(spec, catalog).partials)
    assert images.reader.workers == 0 and images.reader.decoded_in_pool == 0
