"""The auditor on a Dask cluster: ``tb-gradient audit --scheduler tcp://HOST:PORT`` (the ``[dask]`` extra).

Each run is one task: a worker reads it (from a path it can reach: a shared filesystem or an ``s3://``/``gs://``
logdir) and sends back the same small result as a local worker process, so the ``--json`` document is the same as a
local audit's. Only the scheduler's address crosses the network from here, never event bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .auditor import UsageError

#: Seconds to wait for the scheduler to answer before the audit fails (exit code 2).
CONNECT_TIMEOUT_SECONDS = 10.0


class SchedulerError(UsageError):
    """The cluster cannot be used: dask is not installed, or the scheduler does not answer."""


def audit_on_cluster(scheduler: str, tasks: Sequence[Any], task: Callable[[Any], dict],
                     on_done: Callable[[dict], None] | None = None, *,
                     timeout: float = CONNECT_TIMEOUT_SECONDS) -> list[dict]:
    """``task(t)`` for every ``t`` of ``tasks`` on the cluster at ``scheduler``; results in the order of ``tasks``."""
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        raise SchedulerError("--scheduler needs dask.distributed: pip install 'tb_gradient_plugin[dask]'") from exc
    try:
        client = Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise SchedulerError(f"cannot reach the Dask scheduler at {scheduler} within {timeout:g} s: "
                             f"{type(exc).__name__}: {exc}") from exc
    try:
        results: list[dict | None] = [None] * len(tasks)
        futures = client.map(task, list(tasks), pure=False)
        index = {future.key: i for i, future in enumerate(futures)}
        for future in as_completed(futures, loop=client.loop):
            results[index[future.key]] = future.result()
            if on_done:
                on_done(results[index[future.key]])
        return results  # type: ignore[return-value]
    finally:
        client.close()
