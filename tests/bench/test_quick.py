"""Every bench's ``--quick`` run: a smoke test so the benches never rot.

No thresholds and no timing asserts: a bench passes when it runs to the end,
exits 0 and prints its JSON result (with its own figures and replica check)
as the last line. Each starts its own real cluster (and, for ``zookeeper``, a
real ZooKeeper ensemble: under ``CI=true`` a missing ZooKeeper fails it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHES

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXTRA = {"core": ["--workers", "0"]}
"""Flags of a bench's smoke run. ``core``'s puts the gateway in the node process
(``--workers 0``): every other bench's nodes run the default gateway workers, so
both paths are covered by one run each (a second ``core`` run cost 26 s of CI)."""


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_quick_run(name: str, tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="150")
    extra = EXTRA.get(name, [])
    proc = subprocess.run(
        [sys.executable, "-m", "bench", name, "--quick", "--json", *extra, "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    assert proc.returncode == 0, f"bench {name} --quick exited {proc.returncode}:\n{tail}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"bench {name} printed nothing:\n{tail}"
    result = json.loads(lines[-1])
    assert result["bench"] == name
    assert result["quick"] is True
    assert list(tmp_path.glob(f"{name}-*.json")), "--out wrote no result file"
    if name == "replication":
        # No member's tick thread failed: a plain pysyncobj member (the raw
        # baseline) once imported the node's Raft module for its statistics at
        # the end of a run, which swapped the framing under its open links.
        for run in result["runs"]:
            assert not run["log_lines"].get("Traceback"), (run["config"], run["log_lines"])
    if name == "core":
        # ``--workers K`` starts the core bench's nodes with K gateway workers (0:
        # the gateway in the node process) and says so in its command and result.
        assert "default settings but --frame-rate 100000 --workers 0" in proc.stdout
        assert result["node_args"] == ["--frame-rate", "100000", "--workers", "0"]
        assert result["command"] == "python -m bench core --quick --workers 0"
        assert all(m["missing"] == 0 and m["delivered"] > 0 for m in result["messages"])


@pytest.mark.parametrize("args", [["fanout", "--workers", "0"], ["core", "--workers", "-1"]])
def test_workers_is_for_the_core_bench_only(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--workers K (K >= 0) is for the core bench only" in proc.stderr
