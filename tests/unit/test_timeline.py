"""chaos.timeline draws a PNG from a history, without a display."""

from __future__ import annotations

import random
import struct
from pathlib import Path

from chaos.history import History
from chaos.timeline import plot_timeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_history(seconds: int = 60, clients: int = 4) -> History:
    rng = random.Random(7)
    h = History()
    events: list[tuple[float, str, str, str, dict[str, object]]] = []
    mid = 0
    for k in range(1, clients + 1):
        p = f"c{k}"
        t = 0.01 * k
        events.append((t, p, "invoke", "login", {"user": f"u{k}"}))
        events.append((t + 0.02, p, "ok", "login", {"user": f"u{k}", "session": f"s{k}",
                                                     "node": "n1"}))
        t += 0.1
        n = 0
        while t < seconds:
            to = f"u{k % clients + 1}"
            body = f"{p}-{n}"
            slow = 25 <= t < 32  # a fault makes sends slow and some time out
            latency = rng.uniform(0.5, 3.0) if slow else rng.uniform(0.002, 0.02)
            events.append((t, p, "invoke", "send", {"to": to, "body": body}))
            roll = rng.random()
            if slow and roll < 0.2:
                events.append((t + latency, p, "info", "send",
                               {"to": to, "body": body, "error": "timeout"}))
            elif roll < 0.01:
                events.append((t + latency, p, "fail", "send",
                               {"to": to, "body": body, "error": "rejected"}))
            else:
                mid += 1
                events.append((t + latency, p, "ok", "send", {"to": to, "body": body,
                                                              "id": mid}))
                events.append((t + latency + 0.01, f"c{k % clients + 1}", "ok", "deliver",
                               {"id": mid, "from": f"u{k}", "to": to, "body": body,
                                "seq": mid, "node": "n1", "epoch": 1}))
            t += latency + rng.uniform(0.02, 0.1)
            n += 1
        if k == 2:
            events.append((seconds - 1.0, p, "invoke", "presence",
                           {"status": "away", "text": None}))  # never completes
    events.append((10.0, "nemesis", "invoke", "kill", {"nodes": ["n1"], "fault": 1}))
    events.append((14.0, "nemesis", "info", "kill", {"healed": True, "fault": 1}))
    events.append((25.0, "nemesis", "invoke", "partition", {"nodes": ["n2"], "fault": 2}))
    events.append((32.0, "nemesis", "info", "partition", {"healed": True, "fault": 2}))
    events.append((50.0, "nemesis", "invoke", "clock", {"nodes": ["n3"], "fault": 3}))
    # stable sort by time keeps each client's invoke before its completion
    for t, p, type_, f, value in sorted(events, key=lambda e: e[0]):
        h.record(p, type_, f, value, time=t)
    return h


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_timeline_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "timeline.png"
    plot_timeline(synthetic_history(), out, "synthetic run")
    assert out.exists()
    data = out.read_bytes()
    assert len(data) > 20_000
    assert png_size(data) == (1600, 900)
    assert data.rstrip().endswith(b"IEND\xaeB`\x82")


def test_plot_timeline_empty_history(tmp_path: Path) -> None:
    out = tmp_path / "empty.png"
    plot_timeline(History(), out, "nothing happened")
    data = out.read_bytes()
    assert png_size(data) == (1600, 900)
    assert len(data) > 5_000
