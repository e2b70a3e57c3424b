"""Run one node: core, client side, admin channel and metrics in one nursery.

The client side is the in-process ``Gateway`` (``workers == 0``) or a
``WorkerPool`` of gateway worker processes sharing the client port.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import structlog
import trio

from .admin import AdminServer
from .auth import Keys, read_secret
from .config import NodeConfig
from .core import Core
from .gateway import Gateway
from .interfaces import GatewayLike
from .metrics import NodeMetrics
from .workers import WorkerPool

log = structlog.get_logger("switchboard.node")


async def run_node(config: NodeConfig, announce: Callable[[dict[str, Any]], None],
                   *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
                   ) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation), then leave the cluster cleanly.

    ``announce`` receives the bound addresses once every listener is up.
    """
    if config.insecure:
        keys = Keys.insecure()
        log.warning("INSECURE: running without a cluster secret; anyone who reaches the "
                    "Raft port can run code in this node, and tokens can be forged")
    else:
        assert config.secret_file is not None
        keys = Keys.from_secret(read_secret(config.secret_file))
    core = Core(config, keys.raft_password)
    gateway: GatewayLike
    if config.workers > 0:
        pool = WorkerPool(config, core, config.workers)
        gateway = pool
        serve_clients = pool.run
    else:
        in_process = Gateway(config, core, keys)
        gateway = in_process
        serve_clients = in_process.serve
    metrics = NodeMetrics(config.id, core, gateway,
                          ready=lambda: core.serving() and not gateway.drained
                          and gateway.listening())
    addresses: dict[str, Any] = {"client": None, "raft": config.raft, "admin": None,
                                 "metrics": None}
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(core.run)
            addresses["client"] = await nursery.start(serve_clients)
            stop = trio.Event()
            if config.admin is not None:
                admin = AdminServer(config, core, gateway, keys, addresses, stop)
                addresses["admin"] = await nursery.start(admin.serve)
            if config.metrics is not None:
                addresses["metrics"] = await nursery.start(metrics.serve, *config.metrics)
            info = {"event": "listening", "id": config.id, **addresses, "pid": os.getpid(),
                    "workers": [w["pid"] for w in gateway.workers()]}
            log.info("listening", **{k: v for k, v in info.items() if k not in ("event", "id")})
            announce(info)
            task_status.started(info)
            async def on_signal() -> None:
                async for sig in signals:
                    log.info("stopping", signal=signal.Signals(sig).name)
                    stop.set()
                    return

            nursery.start_soon(on_signal)
            await stop.wait()
            await gateway.shutdown()
            await core.leave()
            nursery.cancel_scope.cancel()
