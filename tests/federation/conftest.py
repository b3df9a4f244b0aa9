"""Several real daemons on loopback (in-process, real mTLS), wired as static peers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from stimctl.client import AsyncClient
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.testing import CertFactory, free_port, shared_data, write_node_config
from tests.helpers import client_config

CNSIM_FIELDS = {
    "row": {"table": "lab", "type": "id"},
    # Bounds wide enough that clamping never bites on CNSIM, so federated == pooled exactly.
    "LAB_TSC": {"table": "lab", "type": "numeric", "unit": "mmol/L", "bounds": [0, 20]},
    "LAB_TRIG": {"table": "lab", "type": "numeric", "unit": "mmol/L", "bounds": [-10, 20]},
    "LAB_HDL": {"table": "lab", "type": "numeric", "unit": "mmol/L", "bounds": [0, 10]},
    "PM_BMI_CONTINUOUS": {"table": "lab", "type": "numeric", "unit": "kg/m2", "bounds": [0, 100]},
    "GENDER": {"table": "lab", "type": "categorical", "levels": ["0", "1"]},
}


def cnsim_catalog(tmp: Path, i: int) -> dict:
    """CNSIM<i> as catalog 'cnsim' (the first, unnamed column is the row id)."""
    root = tmp / f"cnsim{i}"
    root.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(shared_data("cnsim", f"CNSIM{i}.csv"))
    df.columns = ["row", *[c.strip() for c in df.columns[1:]]]
    df["row"] = [f"s{i}-{r}" for r in df["row"]]
    df.to_csv(root / "lab.csv", index=False)
    return {"name": "cnsim", "description": "DataSHIELD CNSIM", "root": str(root),
            "subject_key": "row", "tables": {"lab": "lab.csv"}, "fields": CNSIM_FIELDS}


def pooled_cnsim() -> pd.DataFrame:
    frames = []
    for i in (1, 2, 3):
        df = pd.read_csv(shared_data("cnsim", f"CNSIM{i}.csv"))
        df.columns = ["row", *[c.strip() for c in df.columns[1:]]]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


@dataclass
class Federation:
    daemons: list[Daemon]
    pki: CertFactory
    tmp: Path

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.daemons[i].port}"

    def client(self, i: int = 0, who: str = "alice", timeout_s: float = 30.0) -> AsyncClient:
        certs = self.pki.issue(who, "researcher") if not (
            self.tmp / "pki" / f"researcher-{who}").exists() else _existing(self.tmp, who)
        return AsyncClient(client_config(certs, self.address(i), timeout_s))


def _existing(tmp: Path, who: str):  # type: ignore[no-untyped-def]
    from stimnetd.testing import CertPaths

    d = tmp / "pki" / f"researcher-{who}"
    return CertPaths(cert=d / f"{who}.crt", key=d / f"{who}.key", ca=d / "ca.crt")


@pytest.fixture
def federation(tmp_path: Path, pki: CertFactory):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def start(catalogs: list[list[dict]], *, per_site: list[dict] | None = None,
                    **sections: dict) -> AsyncIterator[Federation]:
        """`per_site[i]`: config sections of daemon i that replace the shared ones."""
        ports = [free_port() for _ in catalogs]
        async with AsyncExitStack() as stack:
            daemons = []
            for i, cats in enumerate(catalogs):
                name = f"site-{chr(ord('a') + i)}"
                certs = pki.issue(name, "node")
                fed_section = {"peers": [f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i],
                               "subjob_timeout_s": 10.0, **sections.get("federation", {})}
                extra = {k: v for k, v in {**sections, **(per_site or [{}] * len(ports))[i]}
                         .items() if k != "federation"}
                path = write_node_config(tmp_path / name, certs, name, port=ports[i],
                                         catalogs=cats, crl=pki.crl_path,
                                         federation=fed_section, gossip={"enabled": False},
                                         **extra)
                d = Daemon(load_config(path))
                await d.start()
                stack.push_async_callback(d.shutdown)
                daemons.append(d)
            yield Federation(daemons, pki, tmp_path)

    return start


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for the disk-full tests (root needed: without it the test skips, and
    fails under CI=true)."""
    mnt = tmp_path / "state-volume"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires mounting a tmpfs for the disk-full test: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
