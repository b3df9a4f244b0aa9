"""What a catalog's data say about its declarations: warnings, not errors.

Values outside a field's declared bounds load (differential privacy clamps them to the
bounds, so a wrong bound biases every noisy answer), and an image with more non-zero voxels
than its field's `max_voxels` makes every voxel-map query over it fail. Image fields have
no numeric bounds: only their voxel counts are checked, and only when `read_images` (every
image is read once: check-config does, start-up does not). Each warning is one line naming
the key; counts are the site's own data, shown to its operator only."""

from __future__ import annotations

import numpy as np

from stimnetd.catalog.loader import Catalog, CatalogSet


def catalog_warnings(catalogs: CatalogSet, *, read_images: bool) -> list[str]:
    out: list[str] = []
    for catalog in catalogs:
        out += _bounds(catalog)
        if read_images:
            out += _voxels(catalog)
    return out


def _bounds(catalog: Catalog) -> list[str]:
    out = []
    for f in catalog.fields.values():
        if f.type not in ("numeric", "integer") or f.bounds is None:
            continue
        lo, hi = f.bounds
        values = catalog.columns().numbers(f.name)
        outside = int(np.count_nonzero((values < lo) | (values > hi)))
        if outside:
            out.append(f"catalog {catalog.name!r}.fields.{f.name}.bounds: {outside} values in "
                       f"table {f.table} lie outside [{lo:g}, {hi:g}]; differential privacy "
                       "clamps them to the bounds (widen the bounds or fix the data)")
    return out


def _voxels(catalog: Catalog) -> list[str]:
    out = []
    frame = catalog.frame()
    for f in catalog.fields.values():
        if f.type != "image" or f.max_voxels is None:
            continue
        paths = frame[f.name].dropna().tolist()
        largest, over = 0, 0
        for rel in paths:
            n = int(np.count_nonzero(catalog.load_image(str(rel)) > 0))
            largest = max(largest, n)
            over += n > f.max_voxels
        if over:
            out.append(f"catalog {catalog.name!r}.fields.{f.name}.max_voxels: {over} of "
                       f"{len(paths)} images have more non-zero voxels than max_voxels "
                       f"({f.max_voxels}; the largest has {largest}); voxel-map queries over "
                       "them are refused until max_voxels is raised")
    return out
