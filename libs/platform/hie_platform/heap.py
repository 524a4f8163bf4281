"""The start-up heap of a serving process, kept out of the garbage collector's full collections.

What a service allocates while it starts (modules, the FHIR and pydantic models, engines, settings,
the registry's directory snapshot) lives as long as the process. Every full collection walked all of
it: ~192,000 objects in 80 ms in an imaging gateway (where pynetdicom's AssociationServer forces a
full collection every 60 poll rounds or associations, inside the relay), 245,000-325,000 in 85-115 ms
in the registry
with 10,000 institutions (2 cores, load 7.5), and the requests in flight waited; those pauses were the
directory's p99 (docs/operations.md, "Sizing: registry directory"). ``gc.freeze()`` after start-up
moves it to a permanent generation that collections skip.

Only in a process that serves (``hie_platform.runtime.serve`` marks it, and uvicorn's worker
processes inherit the mark through the environment): a test process builds hundreds of apps, and
what one froze would never be collected.
"""

from __future__ import annotations

import gc
import os
import warnings

from hie_platform.logging import get_logger

log = get_logger(__name__)

_SERVING = "HIE_SERVING_PROCESS"


def mark_serving() -> None:
    """This process (and the worker processes it starts) serves: freeze its heap after start-up."""
    os.environ[_SERVING] = "1"


def serving() -> bool:
    return os.environ.get(_SERVING) == "1"


def freeze_startup_heap() -> None:
    """Collect once, then freeze what is left. A resource that something else left unclosed is
    finalized by this collection: its ResourceWarning becomes a log line, not an exception in the
    service's start."""
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    for warning in found:
        log.warning("resource left unclosed before start-up ended", detail=str(warning.message)[:200])
    gc.freeze()
