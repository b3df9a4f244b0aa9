"""A map's PNG for a paper or a lab meeting: nilearn's stat-map plot on the MNI152
template nilearn ships (no download), with a colorbar, cut coordinates in mm and L/R.

The template is the right background only for MNI maps; a map in an undeclared space is
drawn on no background rather than on an anatomy it may not match.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np


def write_map_png(img: Any, path: Path, *, title: str, mni: bool) -> Path:  # noqa: ANN401
    """Draw `img` (a NIfTI image; NaN = no value) to `path` through its peak voxel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from nilearn import plotting
    from nilearn.datasets import load_mni152_template

    data = np.asarray(img.dataobj, dtype=np.float32)
    finite = np.where(np.isfinite(data), data, 0.0)  # nilearn warns on NaN
    clean = nib.Nifti1Image(finite, img.affine, img.header)
    if np.any(finite != 0):
        peak = np.unravel_index(int(np.argmax(np.abs(finite))), finite.shape)
        cut = tuple(float(c) for c in nib.affines.apply_affine(img.affine, peak[:3]))
    else:
        cut = (0.0, 0.0, 0.0)
    fig = plt.figure(figsize=(10, 3.6))
    try:
        with warnings.catch_warnings():
            if not np.any(finite != 0):
                # A map with no value anywhere (a thresholded map where no voxel survives)
                # is still drawn, as the template alone; nilearn warns that it is empty.
                warnings.filterwarnings("ignore", message="empty mask")
            plotting.plot_stat_map(
                clean, bg_img=load_mni152_template(resolution=1) if mni else None,
                cut_coords=cut, display_mode="ortho", colorbar=True, annotate=True,
                draw_cross=False, black_bg=False, title=title, figure=fig)
        fig.savefig(path, dpi=100, facecolor="white")
    finally:
        plt.close(fig)
    return Path(path)
