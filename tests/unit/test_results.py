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
    assert print_answer(ANSWER, _args(tmp_path / "r.json", json=True)) == 0
    assert json.loads((tmp_path / "r.json").read_text())["job"] == "job123"
    assert print_answer(ANSWER, _args(tmp_path / "r.csv", csv=True)) == 0
    assert (tmp_path / "r.csv").read_text().splitlines() == ["count(*)", "20"]
    assert print_answer(ANSWER, _args(tmp_path / "new" / "dir")) == 0
    assert json.loads((tmp_path / "new" / "dir" / "result.json").read_text())["result"]["rows"] \
        == [[20]]
    assert "wrote" in capsys.readouterr().err


def test_a_contingency_table_is_shown_as_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Rows are the first field's levels, columns the second's; cells every site withheld
    read as —. (It used to be printed as a JSON document.)"""
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
    """An alias, level or peer's detail reading "[/bold]" raised MarkupError (the answer
    was lost to a traceback), and "[x]" vanished from the table."""
    ans = QueryAnswer("job7", {"result": {"columns": ["[/bold]", "n [x]"], "rows": [[1, 2]]},
                               "manifest": [{"site": "[red]a", "state": "done", "n": 20,
                                             "detail": "[/]"}]})
    assert print_answer(ans, _args(None)) == 0
    out = capsys.readouterr().out
    for text in ("[/bold]", "n [x]", "[red]a", "[/]"):
        assert text in out, (text, out)
