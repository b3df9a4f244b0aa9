"""One block's share of a catalog, on the host: the directory a block's container sees as /data.

Under sample-and-aggregate (privacy/blocks.py) each run of a script may see its own block's
subjects only. The block's directory has the catalog's layout (the same relative table
paths and image paths, so the manifest and the runtime are unchanged) holding the block's
rows of every table and the image files those rows name. Images are hard links where the
state directory shares the catalog's filesystem (no copy), else copies. Blocking: call
these through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pandas as pd


def write_block(dest: Path, root: Path, tables: Mapping[str, str], subject_key: str,
                image_fields: Sequence[str], subjects: Collection[str]) -> None:
    """Make `dest` hold the rows of `subjects` of each table (`tables`: name → path
    relative to `root`) and the image files named in their `image_fields` columns."""
    dest.mkdir(mode=0o755, parents=True)
    wanted = set(subjects)
    root = root.resolve()
    for rel in tables.values():
        frame = pd.read_csv(root / rel, dtype=str, keep_default_na=False)
        # The catalog loader strips header spaces; the file keeps them, and so does the copy.
        key = next(c for c in frame.columns if str(c).strip() == subject_key)
        rows = frame[frame[key].isin(wanted)]
        out = dest / rel
        out.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        rows.to_csv(out, index=False)
        out.chmod(0o644)
        for column in frame.columns:
            if str(column).strip() in image_fields:
                for path in rows[column]:
                    if path:
                        _place(root, dest, path)


def _place(root: Path, dest: Path, rel: str) -> None:
    src = (root / rel).resolve()
    if not src.is_relative_to(root):
        # The loader refused such paths at start-up; a file changed since is not followed.
        return
    target = dest / src.relative_to(root)
    if target.exists():
        return
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        os.link(src, target)
    except OSError:
        shutil.copyfile(src, target)
        target.chmod(0o644)


def remove_block(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
