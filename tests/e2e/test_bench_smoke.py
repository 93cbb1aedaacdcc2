"""Smoke test of the benchmark suite: `bench/run` still works end to end.

Runs the cheapest useful mode, gateway only (no Node server needed), and checks
that the markdown report is written with a number in every cell. It asserts
nothing about speed: the figures depend on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "run"
EXPECTED_ROWS = ("appends/s, 1 stream", "appends/s, 1,000 streams", "catch-up read", "JSON batched")
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?( †)?$")  # † marks a cell with warnings


def _can_get(tool: str) -> bool:
    # bench/run installs wrk / redis-server with apt-get when it runs as root.
    return shutil.which(tool) is not None or (os.geteuid() == 0 and shutil.which("apt-get"))


@pytest.mark.timeout(600)  # a fresh clone first installs matplotlib; the run itself is ~30 s
def test_bench_quick_gateway_only(tmp_path: Path) -> None:
    if not _can_get("wrk") or not (
        os.access("/usr/bin/redis-server", os.X_OK) or _can_get("apt-get")
    ):
        pytest.skip("bench/run needs wrk and redis-server (installed by bench/run as root)")
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(BENCH), "--quick", "--scenarios", "a,c,e", "--only", "gateway", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    log = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, log

    md = (out / "latest.md").read_text()
    table = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "gateway (1 worker)" in header
    assert "Node" not in header  # --only gateway: no Node columns, no ratios
    assert len(body) == len(EXPECTED_ROWS), table
    for expected, row in zip(EXPECTED_ROWS, body, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].startswith(expected), row
        assert cells[1] in ("higher ↑", "lower ↓"), row
        value = cells[2]
        assert NUMBER.match(value), f"not a number in {row!r}\n{log}"
        assert float(value.removesuffix(" †").replace(",", "")) > 0, row
    assert "ERROR" not in md.split("## Errors and warnings", 1)[1], md

    data = json.loads((out / "latest.json").read_text())
    assert set(data["medians"]) == {"gw-native-1w"}
    assert data["versions"]["redis-server"].startswith("Redis server v=")
