"""A small service to run with ``happen run``: no event loop, no signals, no settings in code.

``setup(system)`` registers the nodes; the command makes the System from its settings
(command line, then ``HAPPEN_*`` environment variables), starts it, serves until SIGINT or
SIGTERM and drains. From this directory::

    happen server --port 4222                                   # terminal 1 (or any NATS)
    export HAPPEN_TRANSPORT=nats://127.0.0.1:4222                 # terminals 2 and 3
    happen run app:setup --workers 2                            # terminal 2
    happen send reports total '[3, 4, 5]'                       # terminal 3: 12
    happen send reports build '{"pages": 5}'                    # a streamed reply
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio

import happen


def setup(system: happen.System) -> None:
    """Register node ``reports``: ``total`` (request/reply) and ``build`` (streamed)."""
    reports = system.create_node("reports")

    @reports.on("total")
    async def total(event: happen.Event, context: dict[str, Any]) -> int:
        return sum(event.payload)

    @reports.on("build")
    async def build(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[Any]:
        # Items with a "progress" figure (0..1) draw a progress line in `happen send`
        # on a terminal; the last item is the result.
        pages = int(event.payload["pages"])
        for page in range(1, pages + 1):
            await anyio.sleep(0.2)  # the work of one page
            yield {"progress": page / pages, "message": f"page {page} of {pages}"}
        yield {"done": True, "pages": pages, "built_by": os.getpid()}
