"""The catalog the attacker tests play against: a ward of subjects with one target.

The target is public knowledge in the usual way an attacker has it: a unique age (77.5),
so `age = 77.5` selects exactly them, while their diagnosis, UPDRS change, disease duration
and image are what the attacker is after. `updrs` is NULL for every non-PD subject (as the
catalog says publicly of `updrs_change`), which is what NULL padding exploits.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

TARGET_AGE = 77.5
GRID = (2, 2, 2)
LEVELS = [f"g{i:02d}" for i in range(12)]


def ward(root: Path, name: str = "ward", *, n: int = 96, target_pd: bool = True,
         target_updrs: float = -33.25, with_images: bool = False) -> dict:
    """`n` subjects: ages 40 to 88 in steps of 48 / n but 77.5 (the last subject is the target, at 77.5
    and in the middle of the others), sex alternating,
    every fourth subject ET (the rest PD), twelve groups `grp` of n / 12 each, `updrs`
    NULL for ET, `responder` 0/1 (the target 1), `stage`
    0/1/2 (the target 2), and with `with_images` a 2x2x2 mask per subject."""
    root.mkdir(parents=True, exist_ok=True)
    step = 48.0 / n  # ages 40 .. 88, whatever n
    ages = [a for a in (40.0 + step * i for i in range(n)) if a != TARGET_AGE][:n - 1]
    ages.append(TARGET_AGE)
    diag = ["ET" if i % 4 == 3 else "PD" for i in range(n - 1)] + ["PD" if target_pd else "ET"]
    updrs = [float(-(i % 30) - 1) if d == "PD" else None for i, d in enumerate(diag)]
    updrs[-1] = target_updrs if target_pd else None
    frame = pd.DataFrame({"sid": [f"p{i:03d}" for i in range(n)], "age": ages,
                          "sex": ["F" if i % 2 else "M" for i in range(n)], "diagnosis": diag,
                          "grp": [LEVELS[i % 12] for i in range(n)], "updrs": updrs,
                          "duration": [float(1 + i % 20) for i in range(n)],
                          "responder": [1.0 if i % 3 == 0 or i == n - 1 else 0.0
                                        for i in range(n)],
                          "stage": [float(i % 3) if i < n - 1 else 2.0 for i in range(n)]})
    fields = {"sid": {"table": "s", "type": "id"},
              "age": {"table": "s", "type": "numeric", "bounds": [0, 100]},
              "sex": {"table": "s", "type": "categorical", "levels": ["F", "M"]},
              "diagnosis": {"table": "s", "type": "categorical",
                            "levels": ["PD", "ET", "dystonia"]},
              "grp": {"table": "s", "type": "categorical", "levels": LEVELS},
              "updrs": {"table": "s", "type": "numeric", "bounds": [-60, 20]},
              "duration": {"table": "s", "type": "numeric", "bounds": [0, 40]},
              # 0/1-coded, as binary outcomes and predictors often are
              "responder": {"table": "s", "type": "numeric", "bounds": [0, 1]},
              "stage": {"table": "s", "type": "numeric", "bounds": [0, 2]}}
    if with_images:
        (root / "img").mkdir(exist_ok=True)
        rng = np.random.default_rng(7)
        for sid in frame["sid"]:
            mask = rng.random(GRID) < 0.6
            mask[0, 0, 0] = True  # every subject covers one voxel: its count is the cohort's
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)),
                     root / "img" / f"{sid}.nii.gz")
        frame["vta"] = [f"img/{s}.nii.gz" for s in frame["sid"]]
        fields["vta"] = {"table": "s", "type": "image", "max_voxels": int(np.prod(GRID))}
    frame.to_csv(root / "s.csv", index=False)
    return {"name": name, "root": str(root), "subject_key": "sid", "tables": {"s": "s.csv"},
            "fields": fields}
