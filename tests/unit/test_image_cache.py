"""The sparse image form and its cache: decoding equals nibabel's dense read, a changed
file is never served from the cache, memory and disk stay within their caps, and a
damaged or misplaced disk entry is discarded."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stimnetd.catalog.imagecache import FileKey, ImageCache
from stimnetd.catalog.loader import CatalogError, read_image
from stimnetd.catalog.sparse import decode_sparse, sparse_of

SHAPE = (9, 7, 5)


def _image(rng: np.random.Generator, dtype: str = "uint8", frac: float = 0.1) -> np.ndarray:
    data = (rng.random(SHAPE) < frac) * rng.integers(1, 5, SHAPE)
    return data.astype(dtype)


def _save(path: Path, data: np.ndarray, nifti2: bool = False, slope: float | None = None) -> Path:
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(data, np.eye(4))
    if slope is not None:
        img.header.set_slope_inter(slope, 0.5)
    nib.save(img, path)
    return path


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64"])
def test_sparse_form_holds_exactly_the_non_zero_voxels(order: str, dtype: str) -> None:
    """Indices are np.flatnonzero's (C order, increasing) and values the image's there,
    in either memory order; -0.0 is zero, NaN and negatives are kept."""
    rng = np.random.default_rng(1)
    data = _image(rng, dtype, 0.3)
    if dtype.startswith("float"):
        data.flat[3] = -0.0
        data.flat[10] = np.nan
        data.flat[11] = -2.5
    if dtype == "int16":
        data.flat[12] = -7
    data = np.asarray(data, order=order)
    s = sparse_of(data)
    want = np.flatnonzero(data)
    np.testing.assert_array_equal(s.index, want)
    np.testing.assert_array_equal(s.values, data.ravel()[want])
    assert s.values.dtype == data.dtype and s.shape == SHAPE
    np.testing.assert_array_equal(s.dense(), np.where(np.isnan(data), np.nan, data))


@pytest.mark.parametrize("name,nifti2,slope", [("a.nii.gz", False, None), ("a.nii", False, None),
                                               ("a.nii.gz", True, None), ("a.nii.gz", False, 2.0)])
def test_decoding_equals_nibabel(tmp_path: Path, name: str, nifti2: bool,
                                 slope: float | None) -> None:
    """gzip, plain, NIfTI-2 (nibabel's path) and scaled images decode to what
    read_image returns, scaling and dtype included."""
    rng = np.random.default_rng(2)
    _save(tmp_path / name, _image(rng, "int16"), nifti2, slope)
    dense = read_image(tmp_path, "c", name)
    s = decode_sparse(tmp_path, "c", name)
    assert s.values.dtype == dense.dtype
    np.testing.assert_array_equal(s.dense(), dense)


def test_a_corrupt_image_is_the_catalogs_error(tmp_path: Path) -> None:
    """A truncated .nii.gz raises read_image's CatalogError, naming the image."""
    path = _save(tmp_path / "t.nii.gz", _image(np.random.default_rng(3)))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CatalogError, match="t.nii.gz is unreadable"):
        decode_sparse(tmp_path, "c", "t.nii.gz")


def test_a_changed_file_has_another_key(tmp_path: Path) -> None:
    """Rewriting a file (even with the same size and mtime) changes its key."""
    rng = np.random.default_rng(4)
    path = _save(tmp_path / "k.nii", _image(rng))
    key = FileKey.of(path)
    st = path.stat()
    _save(path, _image(rng))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and FileKey.of(path) != key


def test_memory_is_bounded_least_recently_used_first() -> None:
    """Entries past the byte cap are dropped oldest-used first; a hit refreshes one."""
    rng = np.random.default_rng(5)
    images = [sparse_of(_image(rng)) for _ in range(4)]
    keys = [FileKey(f"/x/{i}", i, 0, i, 0) for i in range(4)]
    cache = ImageCache(max_bytes=images[0].nbytes + images[1].nbytes + images[2].nbytes - 1)
    cache.put(keys[0], images[0])
    cache.put(keys[1], images[1])
    assert cache.get(keys[0]) is images[0]
    cache.put(keys[2], images[2])
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is images[0]
    assert cache.bytes <= cache.max_bytes and len(cache) == 2


def test_entries_persist_on_disk_and_damaged_ones_are_discarded(tmp_path: Path) -> None:
    """A new cache on the same directory serves an entry from disk; an entry with a
    flipped byte, or filed under another key, is discarded and deleted."""
    rng = np.random.default_rng(6)
    a, b = sparse_of(_image(rng)), sparse_of(_image(rng, "float32"))
    ka, kb = FileKey("/x/a", 1, 2, 3, 4), FileKey("/x/b", 1, 2, 3, 5)
    first = ImageCache(1 << 20, tmp_path, 1 << 20)
    first.put(ka, a)
    first.put(kb, b)
    again = ImageCache(1 << 20, tmp_path, 1 << 20)
    got = again.get(ka)
    assert got is not None and again.counters.disk_hits == 1
    np.testing.assert_array_equal(got.index, a.index)
    np.testing.assert_array_equal(got.values, a.values)
    entry = tmp_path / f"{kb.name()}.img"
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert again.get(kb) is None and not entry.exists()
    # A valid entry of one key copied to another key's name is not that key's.
    (tmp_path / f"{kb.name()}.img").write_bytes((tmp_path / f"{ka.name()}.img").read_bytes())
    assert ImageCache(1 << 20, tmp_path, 1 << 20).get(kb) is None
    assert again.counters.discarded == 1


def test_disk_is_bounded(tmp_path: Path) -> None:
    """Writing past the disk cap removes the oldest entries."""
    rng = np.random.default_rng(7)
    images = [sparse_of(_image(rng, frac=0.5)) for _ in range(10)]
    probe = ImageCache(1 << 20, tmp_path / "probe", 1 << 20)
    probe.put(FileKey("/x/p", 0, 0, 0, 0), images[0])
    cap = 4 * next((tmp_path / "probe").glob("*.img")).stat().st_size
    cache = ImageCache(1 << 20, tmp_path / "c", cap)
    for i, im in enumerate(images):
        cache.put(FileKey(f"/x/{i}", i, 0, i, 0), im)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.img"))
    assert 0 < on_disk <= cap
    assert (tmp_path / "c" / f"{FileKey('/x/9', 9, 0, 9, 0).name()}.img").exists()
    assert not (tmp_path / "c" / f"{FileKey('/x/0', 0, 0, 0, 0).name()}.img").exists()


def test_gunzip_equals_gzip_for_one_member_several_and_a_lying_trailer() -> None:
    """The pre-sized gunzip returns gzip.decompress's bytes, whatever the trailer says."""
    import gzip

    from stimnetd.catalog.sparse import gunzip

    body = bytes(100_000) + b"x" * 10
    one = gzip.compress(body)
    two = gzip.compress(body[:50]) + gzip.compress(body[50:])
    lying = one[:-4] + (12).to_bytes(4, "little")
    assert gunzip(one) == body and gunzip(two) == body
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(lying)
    with pytest.raises(gzip.BadGzipFile):
        gunzip(lying)
