"""A federated answer as the researcher holds it: tables, maps, manifest, privacy."""

from __future__ import annotations

import json
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
    def missing(self) -> list[dict[str, Any]]:
        """The manifest's rows for sites known to hold the catalog that did not contribute,
        each with its `reason` (left, dead, suspect, unreachable, timed out, refused,
        suppressed, failed) and `detail`. Empty when every known site contributed."""
        return [m for m in self.manifest if m.get("state") != "done"]

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
        """The result table (a GLM's coefficients, a meta-analysis's pooled rows, or the
        aggregates) as a DataFrame. A cell every site withheld (k_min) is `pd.NA`, never
        an unmarked NaN, and `df.attrs["suppressed"]` lists each withheld cell as
        ``{"column", "row", "group", "reason"}`` (row: the frame's index)."""
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=self.columns)
        withheld: list[dict[str, Any]] = []
        for entry in self.result.get("suppressed", []):
            if entry.get("scope") != "all":
                continue  # some sites released the cell: its value is theirs (noted)
            name = str(entry.get("name", ""))
            cols = [c for c in df.columns if c == name or str(c).startswith(f"{name}[")]
            group = {str(k): str(v) for k, v in (entry.get("group") or {}).items()}
            for i in range(len(df)):
                if all(k in df.columns and str(df.at[i, k]) == v for k, v in group.items()):
                    withheld += [{"column": col, "row": i, "group": group,
                                  "reason": entry.get("reason")} for col in cols]
        for cell in withheld:
            col = cell["column"]
            if df[col].dtype != object:
                df[col] = df[col].astype(object)
            df.at[cell["row"], col] = pd.NA
        df.attrs["suppressed"] = withheld
        return df

    @property
    def glm(self) -> dict[str, Any] | None:
        """A GLM's fit: deviance, null deviance, AIC, iterations, n, covariance…"""
        return self.result.get("glm")

    @property
    def meta(self) -> list[dict[str, Any]]:
        """A meta-analysis: per coefficient, the pooled fits, heterogeneity, site rows
        and leave-one-site-out fits."""
        return list(self.result.get("meta") or [])

    def _meta_term(self, term: str | None) -> dict[str, Any]:
        terms = self.meta
        if not terms:
            raise ValueError("this answer is not a meta-analysis")
        if term is None:  # the one of interest: the slope when there is one
            return terms[-1] if len(terms) > 1 else terms[0]
        for t in terms:
            if t["term"] == term:
                return t
        raise ValueError(f"no coefficient {term!r}; the answer has "
                         f"{', '.join(t['term'] for t in terms)}")

    def forest_frame(self, term: str | None = None):  # type: ignore[no-untyped-def]
        """A forest plot's rows as a DataFrame: one per site, then the fixed, DL and REML
        pooled estimates (`term`: which coefficient; default the last)."""
        import pandas as pd

        t = self._meta_term(term)
        rows = [{"row": s["site"], "n": s["n"], "estimate": s["estimate"],
                 "std_error": s["std_error"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                 "weight_fixed": s["weight_fixed"], "weight_dl": s["weight_dl"],
                 "weight_reml": s["weight_reml"]} for s in t["sites"]]
        rows += [{"row": m, "estimate": t[m]["estimate"], "std_error": t[m]["std_error"],
                  "ci_low": t[m]["ci_low"], "ci_high": t[m]["ci_high"], "tau2": t[m]["tau2"],
                  "i2": t[m]["i2"], "p_value": t[m]["p_value"]} for m in ("fixed", "dl", "reml")]
        return pd.DataFrame(rows)

    def save_forest(self, path: Path, term: str | None = None) -> Path:
        """Write the forest plot PNG of one coefficient's meta-analysis."""
        from stimctl.forest import write_forest

        t = self._meta_term(term)
        return write_forest(t, Path(path), str((self.doc.get("query") or {}).get(
            "aggregates", [{}])[0].get("name", "meta-analysis")))

    def map_array(self, name: str | None = None, which: str | None = None, *,
                  group: dict[str, str] | None = None) -> np.ndarray:
        """A voxel map's array: `which` is "count" (subjects covering each voxel) or
        "mean" (the weighted mean, or the covered fraction of an unweighted mean_map, or
        a continuous image's mean value); a voxel test (tmap, tmap2, prop_map, corr_map)
        has "stat" (t, prop_map's fraction, or corr_map's Pearson r), "p", "q"
        (corrected), "thresholded" (stat where q <= alpha), "df", "count" and "cohort".
        By default the mean or stat where the map has one, else the count. `group`: which
        group's map of a grouped query (e.g. {"target": "STN"})."""
        return self._array(self._map(name, group), which)

    def to_nifti(self, name: str | None = None, which: str | None = None, *,  # type: ignore[no-untyped-def]
                 group: dict[str, str] | None = None):
        """The map as a NIfTI image with the catalog's affine (see `map_array`)."""
        m = self._map(name, group)
        return self._nifti(m, self._array(m, which))

    @staticmethod
    def _nifti(m: dict[str, Any], arr: np.ndarray):  # type: ignore[no-untyped-def]
        import nibabel as nib

        affine = np.asarray(m["affine"], dtype=np.float64)
        img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine)
        # The inputs' space code (4 = MNI) when every site's images agreed on it, else
        # "aligned" (2): the affine maps to some world space nobody declared.
        code = int(m.get("xform_code") or 0) or 2
        img.set_sform(affine, code=code)
        img.set_qform(affine, code=code)
        return img

    def sidecar(self, name: str | None = None, which: str | None = None, *,
                group: dict[str, str] | None = None) -> dict[str, Any]:
        """Provenance of a map, as written next to its NIfTI by `save_maps`: job id,
        query, the sites and n, each site's mechanism and ε, and the correction applied."""
        return self._sidecar(self._map(name, group), which)

    def _title(self, m: dict[str, Any], which: str) -> str:
        """The query, n and threshold, as the figure's title."""
        q = self.doc.get("query") or {}
        text = q.get("sql") if isinstance(q, dict) and q.get("sql") else m.get("name")
        threshold = m.get("threshold") or "unthresholded"
        return (f"{str(text)[:90]}{_group_label(m)} | {which} | n = {m.get('n')} | "
                f"{threshold}")

    def _sidecar(self, m: dict[str, Any], which: str | None) -> dict[str, Any]:
        code = int(m.get("xform_code") or 0)
        return {
            "job_id": self.job_id,
            "map": m.get("name"),
            "group": m.get("group") or {},
            "array": which,
            "query": self.doc.get("query"),
            "n": m.get("n"),
            "sites": [{k: s.get(k) for k in ("site", "state", "n", "reason") if k in s}
                      for s in self.manifest],
            "privacy": [{k: p.get(k) for k in ("site", "mechanism", "epsilon", "delta")}
                        for p in self.privacy],
            "correction": m.get("correction"),
            "space": "MNI" if code == 4 else "undeclared",
            "sform_code": code or 2,
            "qform_code": code or 2,
        }

    def _array(self, m: dict[str, Any], which: str | None) -> np.ndarray:
        have = _arrays_of(m)
        if which is None:
            which = next((w for w in ("mean", "stat") if w in have), "count")
        key = have.get(which)
        if key is None or key not in self.arrays:
            raise KeyError(f"map {m.get('name')!r}{_group_label(m)} has no {which!r} array "
                           f"(it has {sorted(k for k, v in have.items() if v in self.arrays)})")
        return self.arrays[key]

    def _map(self, name: str | None, group: dict[str, str] | None = None) -> dict[str, Any]:
        if not self.maps:
            raise KeyError("this answer has no voxel maps")
        names = list(dict.fromkeys(m.get("name") for m in self.maps))
        if name is None:
            if len(names) > 1:
                raise KeyError(f"this answer has several maps, name one of {names}")
            name = names[0]
        found = [m for m in self.maps if m.get("name") == name
                 and (group is None or (m.get("group") or {}) == group)]
        if not found:
            raise KeyError(f"no map named {name!r}{' in group ' + repr(group) if group else ''};"
                           f" maps: {[(m.get('name'), m.get('group') or {}) for m in self.maps]}")
        if len(found) > 1:
            raise KeyError(f"map {name!r} has one per group: pass group=, one of "
                           f"{[m.get('group') or {} for m in found]}")
        return found[0]

    def save_maps(self, out_dir: Path) -> list[Path]:
        """Each map (each group's, in a grouped query) as NIfTI (count and mean) plus a PNG
        on the MNI152 template (stimctl/mapfigure.py); files are named by map and group."""
        import nibabel as nib

        from stimctl.mapfigure import write_map_png

        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for m in self.maps:
            stem = _safe(m["name"]) + "".join(f"_{_safe(k)}-{_safe(str(v))}"
                                              for k, v in sorted((m.get("group") or {}).items()))
            for which, key in _arrays_of(m).items():
                if key not in self.arrays:
                    continue
                img = self._nifti(m, self.arrays[key])
                path = out_dir / f"{stem}_{which}.nii.gz"
                nib.save(img, path)
                written.append(path)
                side = path.with_suffix("").with_suffix(".json")
                side.write_text(json.dumps(self._sidecar(m, which), indent=2, default=str) + "\n")
                written.append(side)
                png = path.with_suffix("").with_suffix(".png")
                write_map_png(img, png, mni=int(m.get("xform_code") or 0) == 4,
                              title=self._title(m, which))
                written.append(png)
        return written


def _arrays_of(m: dict[str, Any]) -> dict[str, str]:
    """{"count": array key, "mean": array key, and a voxel test's "stat", "p", ...} as far
    as the map has them."""
    out = {}
    given = m.get("arrays")
    named: dict[str, Any] = given if isinstance(given, dict) else {}
    for which in ("count", "mean", *named):
        key = m.get(f"{which}_key") or named.get(which) or m.get(which)
        if isinstance(key, str):
            out[which] = key
    return out


def _group_label(m: dict[str, Any]) -> str:
    g = m.get("group") or {}
    return " [" + ", ".join(f"{k}={v}" for k, v in sorted(g.items())) + "]" if g else ""


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_") or "map"
