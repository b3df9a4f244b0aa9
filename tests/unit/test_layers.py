"""The import graph keeps the layer contract written in pyproject.toml ([tool.importlinter]).

`lint-imports` (import-linter) checks it; these tests run it so that an upward import, a
cycle or a client import of the daemon fails the suite, and pin the contract itself so
that loosening it is a visible change to this file too.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LAYERS = [
    "stimnetd.rpc",
    "stimnetd.jobs",
    "stimnetd.federation",
    "stimnetd.site",
    "stimnetd.query | stimnetd.privacy | stimnetd.gossip | stimnetd.sandbox",
    "stimnetd.store",
    "stimnetd.catalog",
    "stimnetd.config",
]


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["name"]: c for c in config["tool"]["importlinter"]["contracts"]}


def test_lint_imports_keeps_every_contract() -> None:
    """`lint-imports` finds no broken contract in stimnet, stimnetd and stimctl."""
    contracts = _contracts()
    r = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = [line for line in r.stdout.splitlines() if line.startswith("Contracts: ")]
    assert (r.returncode, summary) == (0, [f"Contracts: {len(contracts)} kept, 0 broken."]), \
        r.stdout[-6000:] + r.stderr[-2000:]


def test_contract_names_the_layers_in_order() -> None:
    """The daemon's layers run rpc → jobs → federation → site → (query | privacy | gossip |
    sandbox) → store → catalog → config."""
    assert _contracts()["daemon layers, higher imports lower only"]["layers"] == LAYERS


def test_contract_forbids_imports_across_the_wire() -> None:
    """The client imports no daemon module, the daemon no client module, the wire package
    neither, and no package holds an import cycle between its children."""
    contracts = _contracts()
    forbidden = {name: (c["source_modules"], c["forbidden_modules"])
                 for name, c in contracts.items() if c["type"] == "forbidden"}
    assert forbidden == {
        "the client speaks the wire contract only": (["stimctl"], ["stimnetd"]),
        "the daemon does not import the client": (["stimnetd"], ["stimctl"]),
        "the wire package depends on neither side of the wire": (["stimnet"], ["stimnetd", "stimctl"]),
        "the aggregate type that privacy and the sandbox share is a leaf":
            (["stimnetd.query.aggregate"], ["stimnetd", "stimctl"]),
    }
    acyclic = contracts["no import cycles between sibling modules"]
    assert (acyclic["type"], acyclic["ancestors"]) == ("acyclic_siblings", ["stimnet", "stimnetd", "stimctl"])
