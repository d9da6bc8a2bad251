"""Where virtual devices run: local worker processes, or Ray actors.

Both backends host one ``DeviceWorker`` per worker (``FastDeviceWorker`` when the config's
``mode`` is "fast": ``worker_class``), which owns a shard of the population for
the whole simulation, and run operations on it in submission order. The coordinator only
sees ``submit(worker, op, args) -> ticket`` and ``completed(tickets)``.

- ``LocalBackend``: ``workers`` child processes (``python -m trainer.simulation.worker``)
  speaking JSON lines over their stdin/stdout: nothing is pickled, and a worker is an
  ordinary process that ignores Ctrl-C (the coordinator stops it).
- ``RayBackend``: the same worker class as Ray actors on a local Ray instance (``address``
  None) or on a cluster (``address="ray://..."`` or "auto"), so a fleet larger than one
  machine uses an existing engine. Ray ships arguments with its own serialization."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def worker_class(config: dict[str, Any]) -> type:
    """The class a worker hosts: full mode's SDK devices, or fast mode's shard."""
    if config.get("mode") == "fast":
        from trainer.simulation.fast import FastDeviceWorker

        return FastDeviceWorker
    from trainer.simulation.devices import DeviceWorker

    return DeviceWorker


# A worker runs one device at a time and the workers share the cores: a BLAS thread pool
# per worker only fights the others (4.5x slower local training, measured with 2 workers on
# 2 busy cores). And every device update allocates and frees arrays of the update's size
# (4 MB for Online Retail's 489k values): with glibc's defaults these are fresh mmaps whose
# pages fault in again each time, which cost more than the training itself (100 Online
# Retail updates: 3.4 s -> 1.8 s with a high mmap threshold and no heap trimming).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


class WorkerError(RuntimeError):
    """A worker failed an operation (the message carries its traceback) or died."""


class LocalBackend:
    name = "local"

    def __init__(self, workers: int, config: dict[str, Any]) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        for name, value in WORKER_ENV.items():
            env.setdefault(name, value)
        self._procs = [
            # The device root on the command line only names the worker in ps/pgrep.
            subprocess.Popen([sys.executable, "-m", "trainer.simulation.worker",
                              str(config.get("root", ""))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                             start_new_session=True)  # Ctrl-C reaches the coordinator only
            for _ in range(workers)]
        self._ids = itertools.count()
        self._selector = selectors.DefaultSelector()
        self._buffers: dict[int, bytes] = {}
        for index, proc in enumerate(self._procs):
            self._selector.register(proc.stdout, selectors.EVENT_READ, index)
            self._buffers[index] = b""
        self._done: dict[int, Any] = {}
        for ticket in [self.submit(w, "init", config) for w in range(workers)]:
            self.result(ticket)

    def submit(self, worker: int, op: str, args: dict[str, Any]) -> int:
        ticket = next(self._ids)
        proc = self._procs[worker]
        line = json.dumps({"id": ticket, "op": op, "args": args}).encode() + b"\n"
        try:
            proc.stdin.write(line)
            proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(f"worker {worker} died (exit code {proc.poll()})") from None
        return ticket

    def _read(self, timeout: float | None) -> None:
        for key, _ in self._selector.select(timeout):
            index = key.data
            chunk = os.read(key.fileobj.fileno(), 1 << 20)
            if not chunk:
                raise WorkerError(f"worker {index} died (exit code "
                                  f"{self._procs[index].wait()})")
            data = self._buffers[index] + chunk
            *lines, self._buffers[index] = data.split(b"\n")
            for line in lines:
                message = json.loads(line)
                self._done[message["id"]] = message

    def completed(self, tickets: Iterable[int]) -> Iterator[tuple[int, Any]]:
        """Yield (ticket, result) as each finishes; a failed operation raises WorkerError."""
        waiting = set(tickets)
        while waiting:
            for ticket in [t for t in waiting if t in self._done]:
                waiting.discard(ticket)
                message = self._done.pop(ticket)
                if "error" in message:
                    raise WorkerError(message["error"])
                yield ticket, message["result"]
            if waiting:
                self._read(timeout=1.0)

    def result(self, ticket: int) -> Any:
        return next(iter(self.completed([ticket])))[1]

    def close(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self._selector.close()


class RayBackend:
    name = "ray"

    def __init__(self, workers: int, config: dict[str, Any], address: str | None = None
                 ) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("--backend ray needs Ray: pip install 'pocketrec[ray]'") from None

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            options: dict[str, Any] = {"address": address, "include_dashboard": False,
                                       "log_to_driver": False, "configure_logging": False}
            if address is None:
                # A local instance: small object store, this checkout's packages.
                options.update(num_cpus=max(workers, os.cpu_count() or 1),
                               object_store_memory=200 * 2**20,
                               runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                                        **WORKER_ENV}})
            ray.init(**options)
        actor = ray.remote(num_cpus=1, max_restarts=0)(worker_class(config))
        self.workers = workers
        self._actors = [actor.remote(config) for _ in range(workers)]
        self._refs: dict[int, Any] = {}
        self._ids = itertools.count()

    def submit(self, worker: int, op: str, args: dict[str, Any]) -> int:
        ticket = next(self._ids)
        self._refs[ticket] = self._actors[worker].handle.remote(op, args)
        return ticket

    def completed(self, tickets: Iterable[int]) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        by_ref = {self._refs[t]: t for t in tickets}
        pending = list(by_ref)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                ticket = by_ref[ref]
                del self._refs[ticket]
                try:
                    yield ticket, ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise WorkerError(str(exc)) from None

    def result(self, ticket: int) -> Any:
        return next(iter(self.completed([ticket])))[1]

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        if self._started:
            self._ray.shutdown()


def make_backend(name: str, workers: int, config: dict[str, Any],
                 address: str | None = None) -> LocalBackend | RayBackend:
    if name == "local":
        return LocalBackend(workers, config)
    if name == "ray":
        return RayBackend(workers, config, address)
    raise ValueError(f"unknown backend {name!r}: local or ray")
