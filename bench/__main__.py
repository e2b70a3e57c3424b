"""python -m bench NAME [--quick] [--json] [--out DIR] [--workers K]; ``python -m bench list``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rich.console import Console

from .common import Options

BENCHES: dict[str, str] = {
    "core": "logins/s, presence updates/s and message throughput with p50/p99 latency "
            "(raw-protocol load generator, 3 nodes)",
    "failover": "SIGKILL of a follower / the leader: time to the resumed session's first "
                "redelivered message (client library)",
    "fsync": "presence commit latency and max throughput with fsync on vs --no-fsync",
    "replication": "the replicated log alone (3 processes): ReplicatedLog + SessionTable vs "
                   "raw pysyncobj group commit, max commands/s and commit latency",
    "fanout": "one presence change reaching 10,000 subscribers spread over 3 nodes",
    "capacity": "idle logged-in sessions held by one node (many gateway workers, many "
                "127.x.y.z source addresses): memory per session, logins/s, idle CPU",
    "zookeeper": "side by side with a 3-server ZooKeeper ensemble (kazoo): sessions/s, "
                 "presence updates, session survival after a server kill",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description="Switchboard benchmarks.")
    p.add_argument("name", help="a bench name, or 'list'")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (under ~60 s; no thresholds)")
    p.add_argument("--json", action="store_true",
                   help="print the results as one JSON object on the last line of stdout")
    p.add_argument("--out", type=Path, help="also write the results (and node logs) to DIR")
    p.add_argument("--workers", type=int, metavar="K",
                   help="core only: start the nodes with --workers K instead of the default "
                        "(one gateway worker per core; 0: the gateway in the node process)")
    args = p.parse_args(argv)
    if args.name == "list":
        for name, doc in BENCHES.items():
            print(f"{name:10} {doc}")
        return 0
    if args.name not in BENCHES:
        p.error(f"unknown bench {args.name!r}; try 'python -m bench list'")
    if args.workers is not None and (args.name != "core" or args.workers < 0):
        p.error("--workers K (K >= 0) is for the core bench only")
    width = None if sys.stdout.isatty() else 150
    opts = Options(args.name, quick=args.quick, json=args.json, out=args.out,
                   console=Console(width=width), err=Console(stderr=True, width=width),
                   workers=args.workers)
    module = importlib.import_module(f"bench.{args.name}")
    module.run(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
