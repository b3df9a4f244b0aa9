"""Job commands: query, submit, jobs, job, results, cancel, approve, deny.

Live progress is one line per site (rich), updated as the sites report; refusals print
the site's reason (which policy, which threshold).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.live import Live
from rich.table import Table
from rich.text import Text

from stimctl import output
from stimctl.client import AsyncClient, JobFailed
from stimctl.exits import EXIT_FAILED
from stimctl.results import QueryAnswer

_STYLE = {"done": "green", "suppressed": "yellow", "refused": "red", "failed": "red",
          "timed_out": "red", "running": "cyan", "accepted": "cyan",
          "awaiting_approval": "magenta"}


_ENDED_WITHOUT_ANSWER = frozenset({"failed", "cancelled", "interrupted"})


class Progress:
    """Per-site progress; a live table on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.sites: dict[str, tuple[str, str, int]] = {}
        self.state = "queued"
        self._last_line = ""
        self._tty = enabled and sys.stderr.isatty()
        self._plain = enabled and not self._tty
        self._live: Live | None = None

    def __enter__(self) -> Progress:
        return self

    def _show(self) -> None:
        """Start the live table at the first event: a request refused before sending
        leaves the terminal with its error line alone."""
        if self._tty and self._live is None:
            self._live = Live(self._render(), console=output.Console(stderr=True),
                              refresh_per_second=8, transient=False)
            self._live.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)

    def _render(self) -> Table:
        t = Table(title=output.plain(f"job: {self.state}"), title_justify="left")
        for h in ("site", "state", "subjects", "detail"):
            t.add_column(h)
        for site, (state, detail, n) in sorted(self.sites.items()):
            style = _STYLE.get(state, "")
            t.add_row(output.plain(site), Text(state, style=style), str(n or ""),
                      output.plain(detail))
        return t

    def __call__(self, kind: str, value: Any) -> None:
        self._show()
        if kind == "state":
            line = f"job {value.id}: {value.state} {value.detail}".rstrip()
            requeues = getattr(value, "requeues", 0)
            if requeues and value.state not in _ENDED_WITHOUT_ANSWER:
                line += f" [re-queued {_times(requeues)} after a restart]"
            # A job that ends without an answer is reported once, by the caller's error
            # line (JobFailed carries the same state and detail); a state the node repeats
            # (its row written, then the job started) is printed once.
            if self._plain and value.state not in _ENDED_WITHOUT_ANSWER \
                    and line != self._last_line:
                print(line, file=sys.stderr)
            self._last_line = line
            self.state = value.state
        elif kind == "site":
            self.sites[value.site] = (value.state, value.detail, value.n)
            if self._plain:
                extra = f" ({value.detail})" if value.detail else ""
                print(f"  {value.site}: {value.state}{extra}", file=sys.stderr)
        elif kind == "log" and (self._plain or self._tty):
            print(f"  log: {value}", file=sys.stderr)
        elif kind == "reconnecting" and (self._plain or self._tty):
            print(f"  {value}", file=sys.stderr)
        if self._live is not None:
            self._live.update(self._render())


def print_answer(ans: QueryAnswer, args: argparse.Namespace) -> int:
    """Print the answer and write what `--out` names; 1 if that could not be written."""
    if getattr(args, "json", False):
        output.emit_json({"job": ans.job_id, **ans.doc})
    elif getattr(args, "csv", False):
        if ans.columns:
            w = csv.writer(sys.stdout)
            w.writerow(ans.columns)
            w.writerows(ans.rows)
        _note_not_in_csv(ans)
    else:
        _print_tables(ans)
    out = getattr(args, "out", None)
    if out is None:
        return 0
    return _write_out(ans, Path(out), also_csv=getattr(args, "csv", False))


def _print_tables(ans: QueryAnswer) -> None:
    """The answer as tables: the result, each statistic beyond it, the contributions."""
    output.table("result", ans.columns, [[_fmt(v) for v in r] for r in ans.rows])
    res = ans.result
    for h in res.get("histograms", []):
        output.table(f"histogram {h.get('name')} {h.get('group') or ''}".rstrip(),
                     ["bin", "count"], [[b, _fmt(c)] for b, c in zip(
                         _bins(h.get("edges", [])),
                         [h.get("under"), *h.get("counts", []), h.get("over")], strict=False)])
    for r in res.get("regressions", []):
        names = r.get("terms") or r.get("names") or []
        output.table(f"regression {r.get('name')} (n={_fmt(r.get('n'))}, residual deviance="
                     f"{_fmt(r.get('rss'))})", ["term", "estimate", "std. error"],
                     [[t, _fmt(c), _fmt(s)] for t, c, s in
                      zip(names, r.get("coefficients") or [], r.get("std_errors") or [],
                          strict=False)])
    for c in res.get("contingency", []):
        _print_contingency(c)
    for t in res.get("meta") or []:
        h = t["heterogeneity"]
        output.table(f"{t['term']}: per site (Q = {_fmt(h['q'])}, df {h['df']}, p = "
                     f"{_fmt(h['p_value'])}, I² = {_fmt(h['i2'])}, τ² DL = "
                     f"{_fmt(t['dl']['tau2'])}, REML = {_fmt(t['reml']['tau2'])})",
                     ["site", "n", "estimate", "std. error", "95% CI", "weight (DL)"],
                     [[s["site"], _fmt(s["n"]), _fmt(s["estimate"]), _fmt(s["std_error"]),
                       f"{_fmt(s['ci_low'])} – {_fmt(s['ci_high'])}", _fmt(s["weight_dl"])]
                      for s in t["sites"]])
        if t["leave_one_out"]:
            output.table(f"{t['term']}: leave one site out",
                         ["omitted", "fixed", "DL", "REML", "I²"],
                         [[lo["omitted"], _fmt(lo["fixed"]["estimate"]),
                           _fmt(lo["dl"]["estimate"]), _fmt(lo["reml"]["estimate"]),
                           _fmt(lo["i2"])] for lo in t["leave_one_out"]])
    _print_voxel_tests(res)
    for roi in res.get("roi_overlap", []):
        output.table(f"ROI overlap {roi.get('name')}", ["roi", "subjects", "mean voxels",
                                                        "mean volume (mm³)"],
                     [[x["roi"], _fmt(x["n"]), _fmt(x["mean_voxels"]),
                       _fmt(x["mean_volume_mm3"])] for x in roi.get("rois", [])])
    output.table("contributions",
                 ["site", "state", "reason", "subjects", "epsilon", "delta", "detail"],
                 [[m["site"], m["state"], m.get("reason", ""), m.get("n") or "",
                   _fmt(m.get("epsilon")), _fmt(m.get("delta")), m.get("detail", "")]
                  for m in ans.manifest])
    if ans.missing:
        # On stderr as well, so a partial answer is loud even when stdout is piped away.
        print("stimctl: warning: partial federation: not contributed: "
              + ", ".join(f"{m['site']} ({m.get('reason') or m['state']})" for m in ans.missing),
              file=sys.stderr)
    for note in ans.notes:
        print(f"note: {note}")


def _print_voxel_tests(res: dict[str, Any]) -> None:
    """One line per voxel-wise test map (its arrays go to --out as NIfTI)."""
    tests = [m for m in res.get("maps", []) if m.get("func") in ("tmap", "tmap2", "prop_map",
                                                               "corr_map")]
    if tests:
        output.table("voxel-wise tests (maps: --out)",
                     ["map", "test", "n", "tested voxels", "significant", "some sites only",
                      "threshold"],
                     [[str(m.get("name")) + "".join(f" [{k}={v}]" for k, v in
                                                    (m.get("group") or {}).items()),
                       m.get("func"), _fmt(m.get("n")), _fmt(m.get("tested_voxels")),
                       _fmt(m.get("significant_voxels")), _fmt(m.get("partial_voxels")),
                       m.get("threshold", "")] for m in tests])


def _print_contingency(c: dict[str, Any]) -> None:
    group = ", ".join(f"{k}={v}" for k, v in (c.get("group") or {}).items())
    rows_lv, cols_lv = (c.get("levels") or [[], []])[:2]
    fields = c.get("fields") or ["", ""]
    output.table(f"contingency {c.get('name')}{' [' + group + ']' if group else ''} "
                 f"(n={_fmt(c.get('n'))}; — = withheld at every site)",
                 [f"{fields[0]} \\ {fields[1]}", *map(str, cols_lv)],
                 [[str(lv), *[_fmt(v) for v in row]]
                  for lv, row in zip(rows_lv, c.get("counts") or [], strict=False)])


def _write_out(ans: QueryAnswer, out: Path, *, also_csv: bool) -> int:
    """Write the answer where `--out` names (a directory, a .json or a .csv file) and its
    maps beside it; 1, saying how to fetch it again, if that fails. `also_csv`: the table
    was printed as CSV, which already noted what CSV leaves out."""
    target = out
    try:
        if out.suffix == "":  # a directory: the whole answer, and each map as NIfTI + PNG
            out.mkdir(parents=True, exist_ok=True)
            target = out / "result.json"
            _write_json(ans, target)
            print(f"wrote {target}", file=sys.stderr)
            for p in ans.save_maps(out) if ans.maps else ():
                target = p
                print(f"wrote {p}", file=sys.stderr)
            return 0
        if out.suffix == ".json":
            _write_json(ans, out)
        else:
            with out.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(ans.columns)
                w.writerows(ans.rows)
            if not also_csv:
                _note_not_in_csv(ans)
        print(f"wrote {out}", file=sys.stderr)
        if ans.maps:
            for p in ans.save_maps(out.parent):
                target = p
                print(f"wrote {p}", file=sys.stderr)
    except OSError as exc:
        # The answer is out (its budget spent): say where it can be had again.
        print(f"stimctl: error: could not write {target}: {exc.strerror or exc}; the answer is "
              f"shown above and `stimctl results {ans.job_id}` fetches it again",
              file=sys.stderr)
        return 1
    return 0


def _note_not_in_csv(ans: QueryAnswer) -> None:
    """CSV holds the result table; say what else the answer has and where to get it."""
    res = ans.result
    names = [x.get("name") for kind in ("histograms", "regressions", "contingency", "maps",
                                        "roi_overlap") for x in res.get(kind, [])]
    if names:
        print(f"stimctl: note: CSV holds the result table only; not in it: "
              f"{', '.join(dict.fromkeys(map(str, names)))} (`stimctl results {ans.job_id} "
              "--json` has everything)", file=sys.stderr)


def _write_json(ans: QueryAnswer, path: Path) -> None:
    with path.open("w") as fh:
        json.dump({"job": ans.job_id, **ans.doc}, fh, indent=2, default=str)


def output_problem(args: argparse.Namespace) -> str | None:
    """Why the output options cannot work, found before anything is submitted: a query's
    budget is spent whether or not its answer can then be written."""
    if getattr(args, "json", False) and getattr(args, "csv", False):
        return "--json and --csv exclude each other"
    out = getattr(args, "out", None)
    if out is None:
        return None
    out = Path(out)
    if out.suffix not in ("", ".json", ".csv"):
        return (f"--out {out}: name a .json or .csv file, or a directory (it gets result.json "
                "and each map as NIfTI + PNG)")
    if out.suffix and out.is_dir():
        return f"--out {out} is a directory; name a file in it"
    if out.suffix and not out.parent.is_dir():
        return (f"--out {out}: {out.parent} is not a directory" if out.parent.exists()
                else f"--out {out}: directory {out.parent} does not exist")
    existing = out if out.suffix == "" else out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # an --out directory is created, with its parents
    if not existing.is_dir():
        return f"--out {out}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: {existing} is not writable"
    return None


def _output_refused(args: argparse.Namespace) -> int | None:
    problem = output_problem(args)
    if problem is None:
        return None
    print(f"stimctl: error: {problem}", file=sys.stderr)
    return 2


def _bins(edges: list[float]) -> list[str]:
    return ["< " + _fmt(edges[0])] + [f"[{_fmt(a)}, {_fmt(b)})" for a, b in
                                      zip(edges, edges[1:], strict=False)] + ["≥ " + _fmt(edges[-1])]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


async def cmd_query(c: AsyncClient, args: argparse.Namespace) -> int:
    if (refused := _output_refused(args)) is not None:
        return refused
    with Progress(enabled=not (args.json or args.csv)) as progress:
        try:
            # The method a notebook calls: one route from `stimctl query` to the sites.
            ans = await c.query(args.sql, federated=args.federated, epsilon=args.epsilon,
                                min_sites=args.min_sites, on_event=progress)
        except JobFailed as exc:
            # The detail names every site that did not contribute and why.
            print(f"stimctl: {exc}", file=sys.stderr)
            return EXIT_FAILED
    code = print_answer(ans, args)
    forest = getattr(args, "forest", None)
    if forest is not None:
        if not ans.meta:
            print("stimctl: --forest needs a meta(...) query", file=sys.stderr)
            return 2
        try:
            ans.save_forest(forest)
        except OSError as exc:
            print(f"stimctl: cannot write {forest}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"forest plot written to {forest}", file=sys.stderr)
    return code


async def cmd_submit(c: AsyncClient, args: argparse.Namespace) -> int:
    if args.watch and (refused := _output_refused(args)) is not None:
        return refused
    try:
        script = args.script.read_bytes()
    except OSError as exc:
        print(f"stimctl: error: cannot read script {args.script}: {exc.strerror}", file=sys.stderr)
        return 2
    job = await c.submit_script(script, args.catalog, federated=args.federated,
                                epsilon=args.epsilon, min_sites=args.min_sites,
                                outputs=args.outputs)
    if not args.watch:
        if args.json:
            output.emit_json(output.message_dict(job))
        else:
            print(f"job {job.id}: {job.state}{' — ' + job.detail if job.detail else ''}")
            print(f"follow it with: stimctl job {job.id}   results: stimctl results {job.id}")
        return 0
    return await _watch_job(c, job, args)


async def cmd_jobs(c: AsyncClient, args: argparse.Namespace) -> int:
    if args.action in ("approve", "deny"):
        if not args.id:
            print(f"stimctl: error: jobs {args.action} needs a job id", file=sys.stderr)
            return 2
        j = await (c.approve(args.id, remember=args.remember) if args.action == "approve"
                   else c.deny(args.id))
        print(f"job {j.id}: {j.state}{' — ' + j.detail if j.detail else ''}")
        return 0
    jobs = await c.list_jobs(args.limit)
    if args.json:
        output.emit_json([output.message_dict(j) for j in jobs])
        return 0
    output.table("jobs", ["id", "kind", "scope", "catalog", "owner", "state", "created", "detail"],
                 [[j.id, j.kind, j.scope, j.catalog, j.owner, j.state,
                   output.ago(j.created_at.ToSeconds()), j.detail] for j in jobs])
    return 0


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


async def cmd_job(c: AsyncClient, args: argparse.Namespace) -> int:
    j = await c.get_job(args.id)
    if args.watch:
        return await _watch_job(c, j, args)
    if args.json:
        output.emit_json(output.message_dict(j))
        return 0
    output.kv(f"job {j.id}", [("kind", j.kind), ("scope", j.scope), ("catalog", j.catalog),
                              ("owner", j.owner), ("state", j.state), ("detail", j.detail or "-"),
                              ("script sha256", j.script_sha256 or "-"),
                              *([("re-queued", f"{_times(j.requeues)} after a restart "
                                  "interrupted it")] if j.requeues else [])])
    if j.sites:
        output.table("sites", ["site", "state", "subjects", "detail"],
                     [[s.site, s.state, s.n or "", s.detail] for s in j.sites])
    return 0


async def _watch_job(c: AsyncClient, job: Any, args: argparse.Namespace) -> int:
    """Follow a job to its end (across a restart of the node) and print its answer."""
    with Progress(enabled=not args.json) as progress:
        try:
            ans = await c.run_job(job, progress)
        except JobFailed as exc:
            print(f"stimctl: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return print_answer(ans, args)


async def cmd_results(c: AsyncClient, args: argparse.Namespace) -> int:
    if (refused := _output_refused(args)) is not None:
        return refused
    return print_answer(await c.result(args.id), args)


async def cmd_cancel(c: AsyncClient, args: argparse.Namespace) -> int:
    j = await c.cancel(args.id)
    print(f"job {j.id}: {j.state}")
    return 0


def register(sub: Any, node_cmd: Callable[..., argparse.ArgumentParser]) -> None:
    q = node_cmd("query", cmd_query, "run an aggregate query (restricted SQL)")
    q.add_argument("sql", help='e.g. "SELECT target, count(*) FROM dbs_outcomes GROUP BY target"')
    q.add_argument("--federated", action="store_true", help="every site holding the catalog")
    q.add_argument("--epsilon", type=float, default=None, help="request differential privacy")
    q.add_argument("--min-sites", type=int, default=1, help="fail unless this many sites answer")
    q.add_argument("--csv", action="store_true", help="result table as CSV")
    q.add_argument("--out", type=Path, metavar="FILE.json|FILE.csv|DIR",
                   help="also write the answer: JSON (all of it) or CSV (the table), or a "
                        "directory that gets result.json and each map as NIfTI + PNG")
    q.add_argument("--forest", type=Path, metavar="FILE.png",
                   help="meta(...): also write the forest plot of its last coefficient")
    sb = node_cmd("submit", cmd_submit, "run a Python script in each site's sandbox")
    sb.add_argument("script", type=Path)
    sb.add_argument("--catalog", required=True)
    sb.add_argument("--outputs", metavar="SQL",
                    help="what the script emits, signed with it, e.g. \"SELECT count(*) AS n, "
                         "avg(age) AS mean_age FROM CATALOG GROUP BY sex\" (no WHERE); sites "
                         "release only exactly that, and most require it")
    sb.add_argument("--federated", action="store_true")
    sb.add_argument("--watch", action="store_true", help="follow per-site progress to the result")
    sb.add_argument("--epsilon", type=float, default=None)
    sb.add_argument("--min-sites", type=int, default=1)
    sb.add_argument("--csv", action="store_true")
    sb.add_argument("--out", type=Path)
    js = node_cmd("jobs", cmd_jobs, "list jobs; admins: `jobs approve|deny ID` for scripts")
    js.add_argument("action", nargs="?", choices=["list", "approve", "deny"], default="list")
    js.add_argument("id", nargs="?")
    js.add_argument("--remember", action="store_true",
                    help="approve this script (by SHA-256) for future jobs too")
    js.add_argument("--limit", type=int, default=50)
    jb = node_cmd("job", cmd_job, "one job and its per-site states")
    jb.add_argument("id")
    jb.add_argument("--watch", action="store_true",
                    help="follow it to its end, across a restart of the node, and print "
                         "its answer")
    r = node_cmd("results", cmd_results, "a finished job's result")
    r.add_argument("id")
    r.add_argument("--csv", action="store_true")
    r.add_argument("--out", type=Path)
    node_cmd("cancel", cmd_cancel, "cancel a running job").add_argument("id")
