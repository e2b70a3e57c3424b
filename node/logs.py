"""Structured logs: one line per event, key=value or JSON, node id in every line.

structlog renders through the standard library, so pysyncobj's own log lines
get the same format and the node id too.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(node_id: str | None, fmt: str = "kv", level: int = logging.INFO,
              worker: int | None = None) -> None:
    """``worker``: this is gateway worker process number ``worker`` of the node."""

    def add_node(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        if node_id is not None:
            event.setdefault("node", node_id)
        if worker is not None:
            event.setdefault("worker", worker)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_node,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "node", "worker", "logger", "event"],
            drop_missing=True)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
        foreign_pre_chain=shared,
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
