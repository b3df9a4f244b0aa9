"""A block's /data (sandbox/blockdata.py): its subjects' rows of every table and their
image files, in the catalog's layout, and nothing of any other subject."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stimnetd.sandbox import SandboxLimits, SandboxRunner
from stimnetd.sandbox.blockdata import remove_block, write_block
from stimnetd.testing import FakeDockerApi


def test_a_block_holds_its_subjects_rows_and_images_only(tmp_path: Path) -> None:
    """Two tables (one with header spaces, as published CSVs have) and an image column:
    the block keeps the rows of s1 and s3 in each, and s1's and s3's images, at the same
    relative paths; removing it leaves the catalog as it was."""
    # Prepare
    root = tmp_path / "catalog"
    (root / "img").mkdir(parents=True)
    for sid in ("s1", "s2", "s3"):
        (root / "img" / f"{sid}.nii").write_bytes(sid.encode())
    (root / "subjects.csv").write_text(" sid , age,vta\ns1,40,img/s1.nii\ns2,50,img/s2.nii\n"
                                       "s3,60,img/s3.nii\n")
    (root / "tables").mkdir()
    (root / "tables" / "out.csv").write_text("sid,score\ns2,1\ns3,NA\n")
    dest = tmp_path / "blocks" / "job" / "b0"
    # Execute
    write_block(dest, root, {"subjects": "subjects.csv", "outcomes": "tables/out.csv"}, "sid",
                ["vta"], {"s1", "s3"})
    # Assert
    subjects = pd.read_csv(dest / "subjects.csv", dtype=str, keep_default_na=False)
    assert subjects.values.tolist() == [["s1", "40", "img/s1.nii"], ["s3", "60", "img/s3.nii"]]
    assert list(subjects.columns) == [" sid ", " age", "vta"]
    outcomes = pd.read_csv(dest / "tables" / "out.csv", dtype=str, keep_default_na=False)
    assert outcomes.values.tolist() == [["s3", "NA"]]
    assert sorted(p.name for p in (dest / "img").iterdir()) == ["s1.nii", "s3.nii"]
    assert (dest / "img" / "s3.nii").read_bytes() == b"s3"
    remove_block(dest)
    assert not dest.exists()
    assert sorted(p.name for p in (root / "img").iterdir()) == ["s1.nii", "s2.nii", "s3.nii"]


async def test_start_up_sweep_removes_blocks_a_crash_left_and_spares_claimed_ones(
        tmp_path: Path) -> None:
    """`reap_orphans` removes every job's blocks directory under the state dir except
    those a running job has claimed (a re-queued job may already be writing its own)."""
    # Prepare
    runner = SandboxRunner(lambda: FakeDockerApi([]), "image", SandboxLimits(), tmp_path,
                           node="saa-sweep", out_tmpfs=False)
    running = runner.claim_blocks("job-running")
    (running / "b0").mkdir(parents=True)
    left = tmp_path / "blocks" / "job-crashed" / "b3"
    left.mkdir(parents=True)
    (left / "subjects.csv").write_text("sid\ns1\n")
    # Execute
    await runner.reap_orphans()
    # Assert
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == ["job-running"]
    runner.release_blocks("job-running")
    await runner.reap_orphans()
    assert list((tmp_path / "blocks").iterdir()) == []
    await runner.shutdown()
