"""A federated answer as the researcher holds it: tables, maps, manifest, privacy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class QueryAnswer:
    job_id: str
    doc: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def result(self) -> dict[str, Any]:
        return self.doc.get("result", {})

    @property
    def columns(self) -> list[str]:
        return list(self.result.get("columns", []))

    @property
    def rows(self) -> list[list[Any]]:
        return [list(r) for r in self.result.get("rows", [])]

    @property
    def manifest(self) -> list[dict[str, Any]]:
        return list(self.doc.get("manifest", []))

    @property
    def privacy(self) -> list[dict[str, Any]]:
        return list(self.doc.get("privacy", []))

    @property
    def notes(self) -> list[str]:
        return list(self.result.get("notes", []))

    @property
    def maps(self) -> list[dict[str, Any]]:
        return list(self.result.get("maps", []))

    def to_pandas(self):  # type: ignore[no-untyped-def]
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns)

    def map_array(self, name: str, which: str = "mean") -> np.ndarray:
        for m in self.maps:
            if m.get("name") == name:
                key = m.get(which) or m.get(f"{which}_key") or m.get("arrays", {}).get(which)
                if key is None or key not in self.arrays:
                    raise KeyError(f"map {name!r} has no {which!r} array (has {sorted(m)})")
                return self.arrays[key]
        raise KeyError(f"no map named {name!r}; maps: {[m.get('name') for m in self.maps]}")

    def to_nifti(self, name: str | None = None, which: str = "mean"):  # type: ignore[no-untyped-def]
        import nibabel as nib

        m = self._map(name)
        arr = self.map_array(m["name"], which)
        affine = np.asarray(m["affine"], dtype=np.float64)
        return nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine)

    def _map(self, name: str | None) -> dict[str, Any]:
        if not self.maps:
            raise KeyError("this answer has no voxel maps")
        if name is None:
            return self.maps[0]
        for m in self.maps:
            if m.get("name") == name:
                return m
        raise KeyError(f"no map named {name!r}")

    def save_maps(self, out_dir: Path) -> list[Path]:
        """Each map as NIfTI (count and mean/sum) plus a PNG of orthogonal slices."""
        import nibabel as nib

        from stimctl.slices import write_slices_png

        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for m in self.maps:
            for which in ("count", "mean"):
                try:
                    img = self.to_nifti(m["name"], which)
                except KeyError:
                    continue
                path = out_dir / f"{_safe(m['name'])}_{which}.nii.gz"
                nib.save(img, path)
                written.append(path)
                png = path.with_suffix("").with_suffix(".png")
                write_slices_png(np.asarray(img.dataobj), png, title=f"{m['name']} ({which})")
                written.append(png)
        return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_") or "map"
