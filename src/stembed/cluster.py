"""The dask cluster a command runs its tasks on: a LocalCluster this run starts, or a running scheduler.

Shared by ``stembed embed`` (one task per tile) and ``stembed cube --sites`` (one task per site).
No torch here; ``distributed`` is imported only when a cluster is wanted.

Ctrl-C: the local workers ignore SIGINT (:func:`workers_ignore_ctrl_c`), so only this process sees
it, and it kills the workers it started (:func:`stop_local_workers`) instead of waiting for their
running tasks; each command's outputs are written so that a rerun resumes what a killed task left.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from typing import Any

from stembed.errors import UserError


class ClusterError(UserError):
    """The dask scheduler given by ``--scheduler`` cannot be reached; the message names the fix."""


def connect(scheduler: str | None, workers: int, timeout_s: float) -> tuple[Any, Any]:
    """A dask Client on ``scheduler``, or on a new LocalCluster of ``workers`` processes (then also returned).

    Raises:
        ClusterError: ``scheduler`` cannot be reached within ``timeout_s``.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout=f"{timeout_s}s", set_as_default=False), None
        except (OSError, TimeoutError, ValueError) as e:
            raise ClusterError(
                f"could not reach the dask scheduler at {scheduler!r} ({type(e).__name__}: {e}); fix: start "
                "it (`dask scheduler`, then `dask worker ADDRESS`) and pass its address, or omit --scheduler "
                "to run on a local cluster"
            ) from e
    with workers_ignore_ctrl_c():
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # any free port
            silence_logs=logging.ERROR,
        )
    return Client(cluster, set_as_default=False), cluster


def stop_local_workers(others: set[int]) -> None:
    """Ctrl-C: kill this run's local worker processes (children not in ``others``) now; closing would wait for
    their running tasks. What a killed task was writing is redone by a rerun (each command marks a piece of
    work done only after its data)."""
    ours = [p for p in multiprocessing.active_children() if p.pid not in others]
    for proc in ours:
        proc.kill()
    for proc in ours:
        proc.join(timeout=5)


@contextlib.contextmanager
def workers_ignore_ctrl_c() -> Iterator[None]:
    """Ignore SIGINT while the local cluster starts: the worker processes inherit the ignored SIGINT (Python
    then installs no KeyboardInterrupt handler), so Ctrl-C reaches this process alone, which stops them.

    Ctrl-C in a terminal signals the whole process group: without this every worker printed its own
    traceback (31-127 lines). The cost: a Ctrl-C in the few seconds the workers take to start is lost
    (press it again). A blocked signal mask instead did not reach the workers (distributed spawns them
    from its own thread).
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def cluster_client(scheduler: str | None, workers: int, timeout_s: float) -> Iterator[Any]:
    """A dask Client for the block (:func:`connect`), closed after it, with the LocalCluster it started; on
    Ctrl-C this run's local workers are killed first (:func:`stop_local_workers`), not waited for.

    Raises:
        ClusterError: ``scheduler`` cannot be reached.
    """
    others = {p.pid for p in multiprocessing.active_children() if p.pid is not None}  # processes this run did not start
    client, cluster = connect(scheduler, workers, timeout_s)
    try:
        yield client
    except KeyboardInterrupt:
        if cluster is not None:
            stop_local_workers(others)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
