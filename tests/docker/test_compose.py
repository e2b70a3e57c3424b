"""The docker-compose end-to-end run: scripts/compose-e2e.sh builds the images
(without a registry), brings docker-compose.yml's cluster up, runs real clients
against the published ports through a container kill, pause and network
disconnect, adds the 4th node, and tears everything down (see docs/docker.md).

Needs a Docker engine and Compose (the `docker compose` plugin or
`docker-compose`); building the local base image the first time needs root.
Under CI=true a missing prerequisite is a failure, elsewhere a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compose-e2e.sh"
LIMIT = 15 * 60  # the run takes about 2.5 min with the base image built, 5 without


def _ok(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _missing() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    if not _ok("docker", "info"):
        return "no Docker engine is reachable (docker info failed)"
    if not _ok("docker", "compose", "version") and not _ok("docker-compose", "version"):
        return "neither the docker compose plugin nor docker-compose is installed"
    base = os.environ.get("BASE_IMAGE", "switchboard-base:bookworm")
    if not _ok("docker", "image", "inspect", base) and os.geteuid() != 0:
        return f"the base image {base} is missing and building it needs root"
    return None


WHY = _missing()
if WHY is not None:
    if IN_CI:
        pytest.fail(f"CI=true and the docker-compose e2e cannot run: {WHY}", pytrace=False)
    pytest.skip(WHY, allow_module_level=True)


@pytest.mark.timeout(LIMIT + 120)
def test_compose_e2e(tmp_path: Path) -> None:
    summary_file = tmp_path / "summary.json"
    env = {**os.environ, "E2E_SUMMARY": str(summary_file)}
    # Its own process group: on a timeout the whole run gets SIGTERM, and the
    # script's trap still tears the compose project down.
    proc = subprocess.Popen([str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"compose-e2e.sh did not finish within {LIMIT} s:\n{out[-6000:]}")
    print(out)
    assert proc.returncode == 0, f"compose-e2e.sh exited {proc.returncode}:\n{out[-8000:]}"
    summary = json.loads(summary_file.read_text())
    assert summary["messages_lost"] == 0, summary
    assert summary["messages_duplicated"] == 0, summary
    assert summary["messages_sent"] > 100, summary
    assert {f["kind"] for f in summary["faults"]} == {"kill", "pause", "disconnect"}, summary
    assert summary["failover_after_kill_s"] is not None, summary
