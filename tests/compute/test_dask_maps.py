"""Voxel maps' per-subject work on a real dask.distributed cluster (a scheduler and two
worker processes on 127.0.0.1): the same partials as in-process, workers sending back
chunk sums only, the catalog's contract judged on the worker, clear errors."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

from stimnet.errors import DataContractViolation
from stimnet.query.sql import parse_sql
from stimnetd.catalog import load_catalogs
from stimnetd.config import ConfigError, load_config
from stimnetd.query.engine import compute
from stimnetd.query.subjects import ComputeUnavailable, DaskImages, InProcess
from stimnetd.testing import CertFactory, write_node_config
from tests.helpers import demo_catalog

SQL = ("SELECT count_map(vta_path), mean_map(vta_path, improvement_pct), "
       "mean_map(vta_path), tmap(vta_path, improvement_pct), "
       "prop_map(vta_path, improvement_pct > 50), roi_overlap(vta_path) FROM dbs_outcomes")


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None)
    try:
        yield str(cluster.scheduler_address)
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("dask")
    entry = demo_catalog(tmp / "catalog", n_subjects=40, seed=11)
    certs = CertFactory(tmp / "pki").issue("node-a", "node")
    cfg = load_config(write_node_config(tmp / "site", certs, "node-a", catalogs=[entry]))
    return load_catalogs(cfg.catalogs).get("dbs_outcomes")


def test_maps_on_the_cluster_equal_the_in_process_maps(scheduler: str, catalog) -> None:  # type: ignore[no-untyped-def]
    """count_map, weighted and unweighted mean_map, the voxel tests' sums (tmap, prop_map),
    roi_overlap: counts exactly, sums to float tolerance, the same n and metadata."""
    spec = parse_sql(SQL)
    local = compute(spec, catalog).partials
    images = DaskImages(scheduler)
    try:
        remote = compute(spec, catalog, images=images).partials
    finally:
        images.close()
    assert [(p.kind, p.n, p.meta) for p in remote] == [(p.kind, p.n, p.meta) for p in local]
    assert local[0].n > 20
    for lp, rp in zip(local, remote, strict=True):
        assert set(lp.stats) == set(rp.stats)
        for key in lp.stats:
            if key in ("count", "n"):
                np.testing.assert_array_equal(rp.stats[key], lp.stats[key])
            else:
                np.testing.assert_allclose(rp.stats[key], lp.stats[key], rtol=1e-12)
    assert local[0].stats["count"].max() > 0
    assert local[-1].kind == "roi_overlap" and local[-1].stats["n"].max() > 0


def test_workers_return_one_sum_per_chunk_not_per_subject(scheduler: str, catalog) -> None:  # type: ignore[no-untyped-def]
    """The cluster runs a handful of chunk tasks (2 per worker), each returning sums."""
    spec = parse_sql("SELECT count_map(vta_path) FROM dbs_outcomes")
    images = DaskImages(scheduler)
    try:
        client = images._connect()
        with get_task_stream(client=client) as stream:
            (p,) = compute(spec, catalog, images=images).partials
    finally:
        images.close()
    tasks = [t for t in stream.data if str(t["key"]).startswith("chunk_sums-")]
    assert len(tasks) == 4 < p.n


def test_an_off_grid_image_is_refused_on_the_worker_as_here(scheduler: str,
                                                            tmp_path: Path) -> None:
    """A worker reading an image off the catalog grid raises the engine's own error."""
    odd = nib.Nifti1Image(np.ones((3, 3, 3), dtype=np.uint8), np.eye(4))
    (tmp_path / "odd.nii.gz").write_bytes(gzip.compress(odd.to_bytes()))
    cat = SimpleNamespace(root=tmp_path, name="c")
    images = DaskImages(scheduler)
    try:
        with pytest.raises(DataContractViolation, match=r"not on the catalog grid \(2, 2, 2\)"):
            images.voxel_sums(cat, "img", (2, 2, 2), None, [("odd.nii.gz", 1.0)])
    finally:
        images.close()


def test_continuous_images_sums_on_the_cluster_equal_the_in_process_sums(
        scheduler: str, tmp_path: Path) -> None:
    """corr_map's per-voxel n, Σx, Σx², Σxw over 12 E-field images, clamped to bounds:
    the workers' chunk sums add up to the in-process sums."""
    rng = np.random.default_rng(5)
    items = []
    for i in range(12):
        x = np.where(rng.random((4, 3, 2)) < 0.5, rng.uniform(0, 3, (4, 3, 2)), 0.0)
        nib.save(nib.Nifti1Image(x.astype(np.float32), np.eye(4)), tmp_path / f"e{i}.nii.gz")
        items.append((f"e{i}.nii.gz", float(rng.normal(10, 3))))
    cat = SimpleNamespace(root=tmp_path, name="c",
                          load_image=lambda rel: np.asarray(nib.load(tmp_path / rel).dataobj))
    local = InProcess().field_sums(cat, "ef", (4, 3, 2), None, (0.0, 2.0), items)
    images = DaskImages(scheduler)
    try:
        remote = images.field_sums(cat, "ef", (4, 3, 2), None, (0.0, 2.0), items)
    finally:
        images.close()
    assert remote[0] == local[0] == 12 and local[1].max() > 1
    np.testing.assert_array_equal(remote[1], local[1])
    for got, want in zip(remote[2:], local[2:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    raw = InProcess().field_sums(cat, "ef", (4, 3, 2), None, None, items)
    assert np.all(local[2] <= 2.0 * local[1]) and np.any(raw[2] > local[2])


def test_an_unreachable_scheduler_is_one_clear_error() -> None:
    """No scheduler at the address: ComputeUnavailable naming it and the setting."""
    images = DaskImages("tcp://127.0.0.1:1")
    with pytest.raises(ComputeUnavailable, match=r"tcp://127.0.0.1:1 cannot be reached.*"
                                                 r"\[compute\] scheduler"):
        images.voxel_sums(SimpleNamespace(root="/x", name="c"), "img", (2, 2, 2), None,
                          [("a.nii", 1.0)])


def test_a_client_connection_is_kept_between_queries(scheduler: str) -> None:
    """The client is made once and reused; close() drops it."""
    images = DaskImages(scheduler)
    first = images._connect()
    assert images._connect() is first and isinstance(first, Client)
    images.close()
    assert images._client is None


@pytest.mark.parametrize(("value", "message"), [
    ("127.0.0.1:8786", "is not a tcp://HOST:PORT"),
    ("http://127.0.0.1:8786", "is not a tcp://HOST:PORT"),
    ("tcp://127.0.0.1:0", "port 0 is out of range"),
])
def test_a_bad_scheduler_address_is_refused_in_one_line(tmp_path: Path, value: str,
                                                        message: str) -> None:
    """[compute] scheduler must be tcp:// or tls:// HOST:PORT."""
    certs = CertFactory(tmp_path / "pki").issue("node-a", "node")
    path = write_node_config(tmp_path / "site", certs, "node-a", compute={"scheduler": value})
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_scheduler_setting_loads(tmp_path: Path) -> None:
    """A good address is kept; without the table the site computes in-process."""
    certs = CertFactory(tmp_path / "pki").issue("node-a", "node")
    path = write_node_config(tmp_path / "site", certs, "node-a",
                             compute={"scheduler": "tcp://10.0.0.5:8786"})
    assert load_config(path).compute.scheduler == "tcp://10.0.0.5:8786"
    bare = write_node_config(tmp_path / "bare", certs, "node-a")
    assert load_config(bare).compute.scheduler is None
