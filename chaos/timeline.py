"""A timeline plot of a chaos run: throughput and send latency, with fault windows.

``plot_timeline(history, path, title)`` writes a 1600x900 PNG with two panels
sharing the time axis:

* top: client throughput per 1-second bucket: ``ok`` sends, ``ok`` ops of all kinds
  (observations excluded) and deliveries observed; ``info`` and ``fail``
  completions are small ticks along the bottom edge;
* bottom: send latency (invoke -> ok) p50 and p99 per 1-second bucket (bucketed by
  completion time), on a log scale when the values span more than 30x.

Every fault window (nemesis invoke to the healing ``info`` with the same ``fault``
number; an unhealed fault runs to the end of the run) is shaded in both panels,
one color per fault kind. Uses matplotlib's Agg canvas directly: no display and
no global backend switch.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from chaos.checker import client_ops, faults, percentile
from chaos.history import OBSERVATIONS, Op

__all__ = ["FAULT_COLORS", "plot_timeline"]

FAULT_COLORS = {
    "kill": "#d62728",
    "pause": "#ff7f0e",
    "partition": "#9467bd",
    "loss": "#8c564b",
    "clock": "#17becf",
    "member": "#2ca02c",
}
_OTHER_COLORS = ["#e377c2", "#bcbd22", "#7f7f7f", "#1f77b4"]
BUCKET_S = 1.0
LOG_RANGE = 30.0


def _per_second(times: Iterable[float], n_buckets: int) -> list[float]:
    counts: Counter[int] = Counter(int(t // BUCKET_S) for t in times)
    return [counts.get(i, 0) / BUCKET_S for i in range(n_buckets)]


def plot_timeline(history: Iterable[Op], path: Path, title: str) -> None:
    """Write the timeline of ``history`` as a PNG at ``path``."""
    ops = list(history)
    end = max((op.time for op in ops), default=0.0)
    n_buckets = max(1, math.ceil(end / BUCKET_S) + (1 if end % BUCKET_S == 0 else 0))
    xs = [(i + 0.5) * BUCKET_S for i in range(n_buckets)]

    cops = client_ops(ops)
    ok_sends = [c.completion.time for c in cops
                if c.f == "send" and c.type == "ok" and c.completion is not None]
    ok_all = [c.completion.time for c in cops if c.type == "ok" and c.completion is not None]
    delivered = [op.time for op in ops if op.f == "deliver" and op.type == "ok"
                 and op.process != "nemesis"]
    info_t = [op.time for op in ops if op.process != "nemesis" and op.type == "info"
              and op.f not in OBSERVATIONS]
    fail_t = [op.time for op in ops if op.process != "nemesis" and op.type == "fail"
              and op.f not in OBSERVATIONS]
    pending_t = [c.invoke.time for c in cops if c.pending]

    lat: dict[int, list[float]] = defaultdict(list)
    for c in cops:
        if c.f == "send" and c.type == "ok" and c.completion is not None:
            lat[int(c.completion.time // BUCKET_S)].append(
                max(0.0, c.completion.time - c.invoke.time))
    lat_x = [(b + 0.5) * BUCKET_S for b in sorted(lat)]
    p50 = [percentile(lat[b], 50) or 0.0 for b in sorted(lat)]
    p99 = [percentile(lat[b], 99) or 0.0 for b in sorted(lat)]

    fig = Figure(figsize=(16, 9), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1]})

    # fault windows, one color per kind
    colors: dict[str, str] = {}
    windows = faults(ops)
    for w in windows:
        if w.kind not in colors:
            colors[w.kind] = FAULT_COLORS.get(
                w.kind, _OTHER_COLORS[len(colors) % len(_OTHER_COLORS)])
        stop = w.end if w.end is not None else max(end, w.start)
        for ax in (top, bottom):
            ax.axvspan(w.start, max(stop, w.start + 0.05), color=colors[w.kind], alpha=0.15,
                       lw=0)
            ax.axvline(w.start, color=colors[w.kind], alpha=0.6, lw=0.8)

    top.plot(xs, _per_second(ok_all, n_buckets), color="#1f77b4", lw=1.4,
             label="ok ops/s (all kinds)")
    top.plot(xs, _per_second(ok_sends, n_buckets), color="#2ca02c", lw=1.4,
             label="ok sends/s")
    if delivered:
        top.plot(xs, _per_second(delivered, n_buckets), color="#7f7f7f", lw=1.0, ls="--",
                 label="deliveries/s")
    tick_tr = top.get_xaxis_transform()  # x in data, y in axes coordinates
    if info_t:
        top.plot(info_t, [0.03] * len(info_t), "|", color="#ff7f0e", ms=8, mew=1.0,
                 transform=tick_tr, label=f"info completions ({len(info_t)})")
    if fail_t:
        top.plot(fail_t, [0.07] * len(fail_t), "|", color="#d62728", ms=8, mew=1.0,
                 transform=tick_tr, label=f"fail completions ({len(fail_t)})")
    if pending_t:
        top.plot(pending_t, [0.11] * len(pending_t), "|", color="#000000", ms=8, mew=1.0,
                 transform=tick_tr, label=f"never completed ({len(pending_t)})")
    top.set_ylabel("throughput (per second)")
    top.set_ylim(bottom=0)
    top.grid(True, alpha=0.3)

    if lat_x:
        bottom.plot(lat_x, p50, color="#1f77b4", lw=1.4, marker=".", ms=3,
                    label="send latency p50")
        bottom.plot(lat_x, p99, color="#d62728", lw=1.4, marker=".", ms=3,
                    label="send latency p99")
        positive = [v for v in p50 + p99 if v > 0]
        if positive and max(positive) / min(positive) > LOG_RANGE:
            bottom.set_yscale("log")
        else:
            bottom.set_ylim(bottom=0)
    else:
        bottom.text(0.5, 0.5, "no acknowledged sends", transform=bottom.transAxes,
                    ha="center", va="center", color="#7f7f7f")
    bottom.set_ylabel("send latency (s)")
    bottom.set_xlabel("time since start (s)")
    bottom.grid(True, alpha=0.3, which="major")
    bottom.grid(True, alpha=0.1, which="minor")
    bottom.set_xlim(0, max(end, 1.0))

    fault_handles = [Patch(facecolor=c, alpha=0.3, label=f"fault: {k}")
                     for k, c in colors.items()]
    h1, l1 = top.get_legend_handles_labels()
    top.legend(h1 + fault_handles, l1 + [str(p.get_label()) for p in fault_handles],
               loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9, frameon=False)
    h2, l2 = bottom.get_legend_handles_labels()
    if h2:
        bottom.legend(h2, l2, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9,
                      frameon=False)

    n_faults = Counter(w.kind for w in windows)
    desc = ", ".join(f"{k} x{n}" for k, n in sorted(n_faults.items())) or "no faults"
    fig.suptitle(f"{title}  ({desc})", fontsize=13)
    fig.subplots_adjust(left=0.06, right=0.84, top=0.93, bottom=0.07, hspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
