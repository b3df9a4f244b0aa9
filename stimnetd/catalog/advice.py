"""What a catalog's data say about its declarations: warnings, not errors.

Values outside a field's declared bounds load (differential privacy clamps them to the
bounds, so a wrong bound biases every noisy answer), and an image with more non-zero voxels
than its field's `max_voxels` makes every voxel-map query over it fail. A continuous
image field's values are checked against its declared bounds, and images' voxel counts
against max_voxels, only when `read_images` (every image is read once: check-config does,
start-up does not). Each warning is one line naming
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
        if f.type != "image" or (f.max_voxels is None and f.bounds is None):
            continue
        paths = frame[f.name].dropna().tolist()
        largest, over, outside = 0, 0, 0
        for rel in paths:
            img = np.asarray(catalog.load_image(str(rel)))
            # A continuous image covers where it is non-zero (query/fieldsums.py).
            n = int(np.count_nonzero(img if f.continuous else img > 0))
            largest = max(largest, n)
            over += f.max_voxels is not None and n > f.max_voxels
            if f.bounds is not None:
                values = img[img != 0]
                outside += bool(np.any((values < f.bounds[0]) | (values > f.bounds[1])))
        if over:
            out.append(f"catalog {catalog.name!r}.fields.{f.name}.max_voxels: {over} of "
                       f"{len(paths)} images have more non-zero voxels than max_voxels "
                       f"({f.max_voxels}; the largest has {largest}); voxel-map queries over "
                       "them are refused until max_voxels is raised")
        if outside and f.bounds is not None:
            out.append(f"catalog {catalog.name!r}.fields.{f.name}.bounds: {outside} of "
                       f"{len(paths)} images have non-zero values outside [{f.bounds[0]:g}, "
                       f"{f.bounds[1]:g}]; differential privacy clamps them to the bounds "
                       "(widen the bounds or fix the images)")
    return out
