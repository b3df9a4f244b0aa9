"""stimctl's answer output: a file that cannot be written does not lose the answer."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from stimctl.jobs_cli import print_answer
from stimctl.results import QueryAnswer

ANSWER = QueryAnswer("job123", {"result": {"columns": ["count(*)"], "rows": [[20]]},
                                "manifest": [{"site": "a", "state": "done", "n": 20}]})


def _args(out: Path | None, **kw: bool) -> argparse.Namespace:
    return argparse.Namespace(json=kw.get("json", False), csv=kw.get("csv", False), out=out)


@pytest.mark.parametrize("name", ["r.json", "r.csv", "dir"])
def test_a_write_that_fails_after_the_answer_says_where_to_get_it_again(
        tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The answer (its budget spent) is printed first; a directory that vanished since the
    options were checked, or a full disk, is an error naming the file and the way back."""
    gone = tmp_path / "gone"
    gone.mkdir()
    shutil.rmtree(gone)
    (gone.parent / "gone").write_text("now a file")  # mkdir and open both fail
    assert print_answer(ANSWER, _args(gone / name)) == 1
    out, err = capsys.readouterr()
    assert "count(*)" in out and "20" in out
    assert err.startswith(f"stimctl: error: could not write {gone / name}"), err
    assert "`stimctl results job123` fetches it again" in err


def test_out_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out FILE.json holds the whole answer, FILE.csv the table, DIR a result.json; each
    written file is named on stderr."""
    assert print_answer(ANSWER, _args(tmp_path / "r.json", json=True)) == 0
    assert json.loads((tmp_path / "r.json").read_text())["job"] == "job123"
    assert print_answer(ANSWER, _args(tmp_path / "r.csv", csv=True)) == 0
    assert (tmp_path / "r.csv").read_text().splitlines() == ["count(*)", "20"]
    assert print_answer(ANSWER, _args(tmp_path / "new" / "dir")) == 0
    assert json.loads((tmp_path / "new" / "dir" / "result.json").read_text())["result"]["rows"] \
        == [[20]]
    assert capsys.readouterr().err.splitlines() == [
        f"wrote {tmp_path / 'r.json'}", f"wrote {tmp_path / 'r.csv'}",
        f"wrote {tmp_path / 'new' / 'dir' / 'result.json'}"]


def test_a_contingency_table_is_shown_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Rows are the first field's levels, columns the second's; cells every site withheld
    read as —; no JSON document is printed."""
    ans = QueryAnswer("job9", {"result": {"columns": [], "rows": [[]], "contingency": [{
        "name": "ct", "fields": ["sex", "target"], "group": {"diagnosis": "PD"}, "n": 30,
        "levels": [["F", "M"], ["STN", "GPi"]], "counts": [[12, None], [18, 0]]}]},
        "manifest": []})
    assert print_answer(ans, _args(None)) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # the title wraps
    assert "ct [diagnosis=PD] (n=30" in flat and "sex \\ target" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("│ F") or ln.startswith("│ M")]
    assert [[c.strip() for c in ln.split("│")[1:4]] for ln in lines] == [
        ["F", "12", "—"], ["M", "18", "0"]], lines
    assert '"counts"' not in out


def test_data_that_looks_like_rich_markup_is_printed_as_it_is(
        capsys: pytest.CaptureFixture[str]) -> None:
    """An alias, level or site detail reading "[/bold]" or "[x]" is printed as written, not
    read as rich markup (which would raise, or hide the text)."""
    ans = QueryAnswer("job7", {"result": {"columns": ["[/bold]", "n [x]"], "rows": [[1, 2]]},
                               "manifest": [{"site": "[red]a", "state": "done", "n": 20,
                                             "detail": "[/]"}]})
    assert print_answer(ans, _args(None)) == 0
    out = capsys.readouterr().out
    for text in ("[/bold]", "n [x]", "[red]a", "[/]"):
        assert text in out, (text, out)


def _grouped_maps() -> QueryAnswer:
    import numpy as np

    maps, arrays = [], {}
    for i, target in enumerate(["GPi", "STN"]):
        arrays[f"c{i}"] = np.full((2, 2, 2), float(i + 1))
        arrays[f"m{i}"] = np.full((2, 2, 2), 10.0 * (i + 1))
        maps.append({"name": "sweet", "group": {"target": target}, "count_key": f"c{i}",
                     "mean_key": f"m{i}", "affine": np.eye(4).tolist(), "shape": [2, 2, 2]})
    maps.append({"name": "cover", "group": {}, "count_key": "c0", "affine": np.eye(4).tolist(),
                 "shape": [2, 2, 2]})
    return QueryAnswer("job5", {"result": {"maps": maps}}, arrays)


def test_each_groups_map_is_its_own_and_is_saved_under_its_group(tmp_path: Path) -> None:
    """A grouped sweet-spot map has one map per group under one name: to_nifti asks which
    group, returns that group's data, and save_maps writes each group to a file named by
    its group."""
    ans = _grouped_maps()
    with pytest.raises(KeyError, match="several maps, name one of"):
        ans.to_nifti()
    with pytest.raises(KeyError, match="one per group: pass group="):
        ans.to_nifti("sweet")
    stn = ans.to_nifti("sweet", group={"target": "STN"})
    assert float(stn.get_fdata().max()) == 20.0  # the mean, by default
    assert float(ans.to_nifti("sweet", "count", group={"target": "GPi"}).get_fdata().max()) == 1
    assert float(ans.to_nifti("cover").get_fdata().max()) == 1.0  # count: it has no mean
    with pytest.raises(KeyError, match=r"has no 'mean' array \(it has \['count'\]\)"):
        ans.to_nifti("cover", "mean")
    names = sorted(p.name for p in ans.save_maps(tmp_path))
    assert names == sorted(f"{stem}_{which}.{ext}" for stem, whiches in (
        ("sweet_target-GPi", ("count", "mean")), ("sweet_target-STN", ("count", "mean")),
        ("cover", ("count",))) for which in whiches for ext in ("nii.gz", "json", "png"))
    import nibabel as nib

    assert float(nib.load(tmp_path / "sweet_target-STN_mean.nii.gz").get_fdata().max()) == 20.0


def test_csv_says_what_it_leaves_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A histogram-only answer under --csv prints no table and names, on stderr, what CSV
    leaves out and where to get it."""
    ans = QueryAnswer("job4", {"result": {"columns": [], "rows": [[]], "histograms": [
        {"name": "histogram(age, 0, 50, 100)", "edges": [0, 50, 100], "counts": [3, 9],
         "under": 0, "over": 0}]}, "manifest": []})
    assert print_answer(ans, _args(None, csv=True)) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "not in it: histogram(age, 0, 50, 100)" in err and "results job4 --json" in err
    assert print_answer(ans, _args(tmp_path / "r.csv")) == 0
    assert "not in it: histogram(age, 0, 50, 100)" in capsys.readouterr().err


def test_plain_progress_prints_a_repeated_state_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal, a state the node sends twice is one line."""
    from types import SimpleNamespace

    from stimctl.jobs_cli import Progress

    p = Progress(enabled=True)
    p._plain, p._tty = True, False  # noqa: SLF001 - as when stderr is not a terminal
    for state in ("running", "running", "succeeded"):
        p("state", SimpleNamespace(id="j1", state=state, detail=""))
    assert capsys.readouterr().err.splitlines() == ["job j1: running", "job j1: succeeded"]


def test_plain_progress_says_a_job_was_requeued_and_followed_again(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal, the watch's reconnection is a line, and each state of a job a
    restart re-queued says so."""
    from types import SimpleNamespace

    from stimctl.jobs_cli import Progress

    p = Progress(enabled=True)
    p._plain, p._tty = True, False  # noqa: SLF001 - as when stderr is not a terminal
    p("state", SimpleNamespace(id="j1", state="running", detail="", requeues=0))
    p("reconnecting", "cannot reach node at n:1; following job j1 again")
    p("state", SimpleNamespace(id="j1", state="running", detail="re-run", requeues=1))
    p("state", SimpleNamespace(id="j1", state="succeeded", detail="", requeues=1))
    assert capsys.readouterr().err.splitlines() == [
        "job j1: running",
        "  cannot reach node at n:1; following job j1 again",
        "job j1: running re-run [re-queued once after a restart]",
        "job j1: succeeded [re-queued once after a restart]"]


def test_histograms_regressions_and_roi_overlap_are_tables(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each statistic beyond the result table gets a table of its own, values formatted:
    histogram bins with their counts, regression terms, ROI overlap per ROI, notes."""
    ans = QueryAnswer("job6", {"result": {
        "columns": ["n"], "rows": [[12]],
        "histograms": [{"name": "h", "edges": [0, 50], "counts": [7], "under": 2, "over": 3}],
        "regressions": [{"name": "fit", "n": 12, "rss": 1.5, "terms": ["(Intercept)", "x"],
                         "coefficients": [0.25, 2.0], "std_errors": [0.125, 0.5]}],
        "roi_overlap": [{"name": "ov", "rois": [{"roi": "stn_left", "n": 9,
                                                 "mean_voxels": 4.5, "mean_volume_mm3": 36.0}]}],
        "notes": ["bins under k_min withheld"]}, "manifest": []})
    assert print_answer(ans, _args(None)) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out if ln.startswith("│")]
    assert rows == [["12"], ["< 0", "2"], ["[0, 50)", "7"], ["≥ 50", "3"],
                    ["(Intercept)", "0.25", "0.125"], ["x", "2", "0.5"],
                    ["stn_left", "9", "4.5", "36"]]
    assert out[-1] == "note: bins under k_min withheld"


def test_the_live_table_starts_at_the_first_event(capsys: pytest.CaptureFixture[str]) -> None:
    """On a terminal the progress table appears with the job's first event, so a request
    refused before sending leaves its one error line alone."""
    from types import SimpleNamespace

    from rich.live import Live

    from stimctl.jobs_cli import Progress

    with Progress(enabled=True) as p:
        p._tty = True  # noqa: SLF001 - as when stderr is a terminal
        before = p._live  # noqa: SLF001
        p("state", SimpleNamespace(id="j1", state="running", detail=""))
        started = type(p._live)  # noqa: SLF001
    assert (before, started) == (None, Live)
    assert "job: running" in capsys.readouterr().err


def test_sites_that_did_not_contribute_are_named_in_the_answer_and_the_cli(capsys) -> None:  # type: ignore[no-untyped-def]
    """QueryAnswer.missing lists them with their reasons; stimctl's table shows the reason
    and warns on stderr."""
    from stimctl.jobs_cli import _print_tables
    from stimctl.results import QueryAnswer

    ans = QueryAnswer("j1", {"result": {"columns": ["n"], "rows": [[12]], "notes": []},
                             "manifest": [
        {"site": "a", "state": "done", "n": 12, "detail": "", "epsilon": None},
        {"site": "b", "state": "absent", "reason": "left", "n": 0, "detail": "left"},
        {"site": "c", "state": "timed_out", "reason": "timed out", "n": 0, "detail": "slow"}]})
    assert [(m["site"], m["reason"]) for m in ans.missing] == [("b", "left"), ("c", "timed out")]
    _print_tables(ans)
    out, err = capsys.readouterr()
    assert "left" in out and "timed out" in out
    assert err.strip() == ("stimctl: warning: partial federation: not contributed: b (left), "
                           "c (timed out)")


def test_withheld_cells_are_marked_in_the_dataframe() -> None:
    """A cell every site withheld is pd.NA with its reason in .attrs, not a bare NaN."""
    import pandas as pd

    from stimctl.results import QueryAnswer

    ans = QueryAnswer("j", {"result": {
        "columns": ["diagnosis", "count(*)", "avg(age)"],
        "rows": [["PD", 20, 41.5], ["ET", None, None]],
        "suppressed": [{"name": "count(*)", "group": {"diagnosis": "ET"},
                        "reason": "k_min: cohort of fewer than 5 subjects", "scope": "all"},
                       {"name": "avg(age)", "group": {"diagnosis": "ET"},
                        "reason": "k_min: cohort of fewer than 5 subjects", "scope": "all"}]}})
    df = ans.to_pandas()
    assert df.at[1, "count(*)"] is pd.NA and df.at[1, "avg(age)"] is pd.NA
    assert df.at[0, "count(*)"] == 20
    assert [(c["column"], c["row"], c["group"]) for c in df.attrs["suppressed"]] == [
        ("count(*)", 1, {"diagnosis": "ET"}), ("avg(age)", 1, {"diagnosis": "ET"})]
    assert all(c["reason"].startswith("k_min") for c in df.attrs["suppressed"])
