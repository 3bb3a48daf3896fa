"""Where a batch's tasks run. Every executor turns `submit(fn, *args)` into a concurrent.futures.Future and
says how many tasks it runs at a time (`slots`); the driver keeps at most that many in flight.

    InProcess      runs the task in the driver, one after another (local, --workers 1)
    Pool           a spawn process pool of --workers processes (local, --workers N > 1)
    RayExecutor    one Ray task per submit, with batch.num_cpus / batch.num_gpus as its resources; a local Ray
                   (ray.init(num_cpus=...), no dashboard) or a cluster (batch.address); a Ray already
                   initialised by the caller is used as it is and left running
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Optional

from aspire.config import BatchSettings
from aspire.errors import ConfigError

RAY_TEMP_MAX_CHARS = 40   # Ray's socket paths (session folder + sockets/plasma_store) must stay under 107 bytes


class InProcess:
    kind = "local (in-process)"
    slots = 1
    threads: Optional[int] = None

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to the driver like a worker's failure
            future.set_exception(e)
        return future

    def close(self) -> None:
        pass


class Pool:
    """A process pool (spawn: no forked torch state); a pool broken by a killed worker is replaced."""

    def __init__(self, workers: int, threads: int):
        self.slots = workers
        self.threads = threads
        self.kind = f"local (process pool of {workers})"
        self._pool: Optional[ProcessPoolExecutor] = None

    def submit(self, fn: Callable, *args: Any) -> Future:
        for _ in range(2):
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.slots, mp_context=multiprocessing.get_context("spawn"))
            try:
                return self._pool.submit(fn, *args)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        raise RuntimeError("the process pool broke twice in a row")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    def __init__(self, settings: BatchSettings, workers: Optional[int], batch_dir: Path):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # else Ray writes a token under the home folder
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'aspire[ray]' (or pip install ray)") from None
        self._ray = ray
        self.settings = settings
        self.owned = not ray.is_initialized()
        # 1. connect to a cluster, or start a local Ray
        if self.owned:
            quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
            if settings.address:
                try:
                    ray.init(address=settings.address, **quiet)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise ConfigError(f"cannot connect to the Ray cluster at {settings.address} "
                                      f"({' '.join(str(e).split())[:200]})") from None
            else:
                cpus = int(workers * settings.num_cpus) if workers else (os.cpu_count() or 1)
                ray.init(num_cpus=max(1, cpus), include_dashboard=False, _temp_dir=ray_temp_dir(settings, batch_dir),
                         **quiet)
        # 2. how many tasks fit at a time, and whether the tasks' resources exist at all
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if settings.num_cpus > cpus or settings.num_gpus > gpus:
            self.close()
            raise ConfigError(f"a batch task asks for {settings.num_cpus:g} CPU and {settings.num_gpus:g} GPU "
                              f"(batch.num_cpus, batch.num_gpus) but the Ray cluster has {cpus:g} CPU and {gpus:g} GPU")
        fit = int(cpus // settings.num_cpus)
        if settings.num_gpus > 0:
            fit = min(fit, int(gpus // settings.num_gpus))
        self.slots = max(1, min(workers, fit) if workers else fit)
        self.threads = max(1, int(settings.num_cpus))
        where = f"cluster {settings.address}" if settings.address else "local Ray"
        self.kind = f"ray ({where}: {cpus:g} CPU, {gpus:g} GPU; {self.slots} tasks at a time)"
        self._remote: dict[Callable, Any] = {}

    def submit(self, fn: Callable, *args: Any) -> Future:
        if fn not in self._remote:
            # max_retries=0: a crashed worker is one failed attempt, retried by the batch like any failure
            self._remote[fn] = self._ray.remote(fn).options(num_cpus=self.settings.num_cpus,
                                                             num_gpus=self.settings.num_gpus, max_retries=0)
        return self._remote[fn].remote(*args).future()

    def close(self) -> None:
        if self.owned and self._ray.is_initialized():
            self._ray.shutdown()


def ray_temp_dir(settings: BatchSettings, batch_dir: Path) -> str:
    if settings.ray_temp_dir:
        return str(Path(settings.ray_temp_dir).expanduser().resolve())
    inside = batch_dir.resolve() / "ray"
    if len(str(inside)) <= RAY_TEMP_MAX_CHARS:
        return str(inside)
    return tempfile.mkdtemp(prefix="aspire-ray-", dir="/tmp" if Path("/tmp").is_dir() else None)


def make_executor(settings: BatchSettings, batch_dir: Path):
    """The executor the settings name (InProcess, Pool or RayExecutor); close() it when done."""
    if settings.executor == "ray":
        return RayExecutor(settings, settings.workers, batch_dir)
    workers = settings.workers or 1
    if workers == 1:
        return InProcess()
    return Pool(workers, max(1, int(settings.num_cpus)))
