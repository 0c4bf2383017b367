"""`bdm upscale --ray`: the upscale job spread over the workers of a Ray cluster (Ray Core actors).

Each worker is an actor that builds its runner once, with the factory the local command uses (the driver sends
that factory as a small picklable callable, never a live runner), then upscales one file per call with the
local job's own per-file step (`upscale_file`: the noise drawn from the seed per image, the same tiling rule,
the output written atomically into the destination). A file therefore comes out bit for bit as the local
command writes it with the same backend and the same thread count.

The driver plans the outputs and skips existing ones as the local job does, keeps one file in flight per
worker, prints a line per finished image, retries a failed file once (on whichever worker is free next) and
lists it when it fails again, and ends with the local job's summary line. Inputs and outputs travel as paths:
on a cluster of several machines they must name the same shared folders on every node.

GPU workers hold one GPU each through Ray's resources (Ray sets CUDA_VISIBLE_DEVICES per actor); CPU workers
hold `threads` CPUs each and run their runner with that many threads.

Ctrl-C kills the workers; Ray kills an actor without unwinding it, so the driver waits until the files in
flight have settled and removes their temporaries itself.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TextIO, Tuple

from bdm.errors import BdmError
from bdm.files import remove_temporaries
from bdm.runtime.sampler import ddim_schedule
from bdm.runtime.upscale import (
    JobSummary, Progress, UpscaleSettings, failure_line, job_budget, job_header, make_folders, plan_outputs,
    skip_done, summary_line, upscale_file)

RETRIES = 1          # a failed file runs once more before it is listed
SETTLE_SECONDS = 30  # after Ctrl-C: how long to wait for the killed workers' files in flight


def import_ray():
    try:
        import ray
    except ImportError:
        raise BdmError("running on a Ray cluster needs Ray, which is not installed here; "
                       "install it with: pip install 'bdm[ray]'") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0):
    """ray.init waits minutes on an address where nobody answers (then exits the process); a TCP connect
    to the head node's port says it in seconds."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise BdmError(f"Ray address {address!r} is not host:port; give the head node's address as `ray start "
                       "--head` printed it (e.g. 10.0.0.5:6379), or 'auto' for a cluster started on this machine")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise BdmError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); check the address, "
                       "or start the cluster there with `ray start --head`") from None


@contextlib.contextmanager
def ray_session(address: Optional[str] = None):
    """Connect this process to the Ray cluster at `address` (or $RAY_ADDRESS); without one, start Ray on this
    machine for the job and stop it after. Either way the driver disconnects at the end (a remote cluster keeps
    running)."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS")  # Ray's own convention
    if address and address != "auto":
        _check_reachable(address)
    options = dict(logging_level=logging.ERROR, log_to_driver=False)
    if not address:
        options.update(address="local", include_dashboard=False)
    else:
        options.update(address=address)
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError, SystemExit) as e:  # ray.init exits on a GCS timeout
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BdmError(f"cannot connect to the Ray cluster at {address or 'this machine'}: {reason}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cpu_layout(cluster_cpus: int, workers: Optional[int], threads: Optional[int]) -> Tuple[int, int]:
    """(workers, threads per worker) for CPU workers. Default: one single-threaded worker per CPU, since
    independent images scale better across processes than one image across threads."""
    if threads is None:
        threads = max(1, cluster_cpus // workers) if workers else 1
    if workers is None:
        workers = max(1, cluster_cpus // threads)
    if workers * threads > cluster_cpus:
        raise BdmError(f"{workers} workers with {threads} thread{'s' * (threads > 1)} each need {workers * threads} "
                       f"CPUs and the Ray cluster has {cluster_cpus}; give fewer workers or threads")
    return workers, threads


@dataclass(frozen=True)
class WorkerModel:
    """What a worker's runner says about itself: enough for the checks the command makes before a job."""

    description: str
    input_names: Tuple[str, ...]
    metadata: dict
    node: str


class UpscaleWorker:
    """The actor (made remote by RayWorkers, so this module imports without Ray): one runner for its life."""

    def __init__(self, make_runner: Callable, threads: Optional[int]):
        self.make_runner, self.threads = make_runner, threads
        self.runner = None

    def load(self) -> WorkerModel:
        import ray

        self.runner = self.make_runner(threads=self.threads)
        return WorkerModel(self.runner.describe(), tuple(self.runner.input_names),
                           dict(getattr(self.runner, "metadata", {})), ray.util.get_node_ip_address())

    def upscale(self, source: Path, target: Path, settings: UpscaleSettings) -> float:
        schedule = ddim_schedule(settings.steps, **settings.schedule)
        return upscale_file(self.runner, source, target, settings, schedule, job_budget(self.runner, settings))


def _reason(error) -> Tuple[str, bool]:
    """(one-line reason, whether the worker still lives) of a failed worker call."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, BdmError):
            return str(cause), True
        return f"{type(cause).__name__}: {cause}", True
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, ray.exceptions.RayActorError):
        return f"its Ray worker died ({first})", False
    return f"Ray failed to run it ({first})", True


class RayWorkers:
    """`workers` actors on the connected cluster, each holding a runner from `make_runner(threads=...)`.

    For the checks the command makes before a job it answers like a runner (`describe`, `input_names`,
    `metadata`, from the first worker loaded); `run_job` is the cluster's `upscale.run_job`. A context
    manager: leaving it kills the workers.
    """

    def __init__(self, make_runner: Callable, workers: Optional[int] = None, threads: Optional[int] = None,
                 gpus: bool = True):
        self.ray = ray = import_ray()
        resources = ray.cluster_resources()
        cluster_gpus = int(resources.get("GPU", 0)) if gpus else 0
        if cluster_gpus:
            workers = workers or cluster_gpus
            if workers > cluster_gpus:
                raise BdmError(f"{workers} GPU workers asked for and the Ray cluster has {cluster_gpus} GPUs "
                               "(one per worker); give fewer workers")
            options = dict(num_gpus=1, num_cpus=threads or 1)
            self.layout = f"{workers} Ray worker{'s' * (workers > 1)}, 1 GPU each"
        else:
            workers, threads = cpu_layout(int(resources.get("CPU", 0)), workers, threads)
            options = dict(num_cpus=threads)
            self.layout = f"{workers} Ray worker{'s' * (workers > 1)} x {threads} CPU thread{'s' * (threads > 1)}"
        actor = ray.remote(UpscaleWorker).options(max_restarts=0, **options)
        self.actors = [actor.remote(make_runner, threads) for _ in range(workers)]
        self.number = {a: i for i, a in enumerate(self.actors, 1)}
        self.loading = {a.load.remote(): a for a in self.actors}
        self.idle, self.node = [], {}
        self.model = None
        try:
            while self.model is None:  # the first worker to answer tells the model; a load error is the same on all
                (ready,), _ = ray.wait(list(self.loading), num_returns=1)
                self._take_load(ready, sys.stderr)
        except BaseException:
            self.close()
            raise

    # -- the runner-like face, for require_inputs and the scale in the model's metadata
    @property
    def input_names(self):
        return self.model.input_names

    @property
    def metadata(self):
        return self.model.metadata

    def describe(self) -> str:
        return f"{self.model.description}; {self.layout}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for actor in self.actors:
            self.ray.kill(actor)

    def _take_load(self, call, stream: TextIO):
        """A finished load: its worker goes idle, or is dropped with its reason (the first one is raised)."""
        actor = self.loading.pop(call)
        try:
            model = self.ray.get(call)
        except self.ray.exceptions.RayError as e:
            reason, _ = _reason(e)
            self.actors.remove(actor)
            if self.model is None:
                raise BdmError(reason) from None
            print(f"bdm: Ray worker {self.number[actor]} failed to start: {reason}", file=stream, flush=True)
            return
        self.model = self.model or model
        self.node[actor] = model.node
        self.idle.append(actor)

    def run_job(self, inputs, output, settings: UpscaleSettings, stream: TextIO = sys.stderr) -> JobSummary:
        """Upscale every input over the workers; see the module docstring."""
        ray = self.ray
        pairs = plan_outputs(inputs, output, settings.fmt)
        make_folders(pairs)
        summary = JobSummary()
        progress = Progress(stream, len(pairs))
        progress.message(job_header(self, settings))
        started = time.perf_counter()
        queue = collections.deque((source, target, 0) for source, target in pairs
                                  if not skip_done(target, settings, summary, progress))
        in_flight = {}  # call -> (actor, source, target, retries so far, started)
        finished = len(summary.skipped)
        try:
            while queue or in_flight:
                while self.idle and queue:
                    actor = self.idle.pop()
                    source, target, retries = queue.popleft()
                    call = actor.upscale.remote(source, target, settings)
                    in_flight[call] = (actor, source, target, retries, time.perf_counter())
                if not in_flight and not self.loading:
                    for source, _, _ in queue:
                        summary.failed.append((source, "no Ray worker is left to run it"))
                        progress.message(failure_line(source, "no Ray worker is left to run it"))
                    break
                (ready,), _ = ray.wait(list(in_flight) + list(self.loading), num_returns=1)
                if ready in self.loading:
                    self._take_load(ready, stream)
                    continue
                actor, source, target, retries, call_started = in_flight.pop(ready)
                try:
                    seconds = ray.get(ready)
                except ray.exceptions.RayError as e:
                    reason, alive = _reason(e)
                    if alive:
                        self.idle.append(actor)
                    else:
                        self.actors.remove(actor)
                    if retries < RETRIES:
                        progress.message(f"bdm: {source.name} failed ({reason}); it will be retried")
                        queue.append((source, target, retries + 1))
                    else:
                        finished += 1
                        summary.failed.append((source, reason))
                        progress.message(f"[{finished}/{len(pairs)}] " + failure_line(source, reason))
                    continue
                self.idle.append(actor)
                finished += 1
                summary.written.append(target)
                summary.sampling_seconds += seconds
                summary.steps += settings.steps
                progress.message(f"[{finished}/{len(pairs)}] wrote {target} (worker {self.number[actor]} on "
                                 f"{self.node[actor]}, "
                                 f"{time.perf_counter() - call_started:.1f} s)")
        except KeyboardInterrupt:
            self.close()
            if in_flight:
                ray.wait(list(in_flight), num_returns=len(in_flight), timeout=SETTLE_SECONDS)
            for _, _, target, _, _ in in_flight.values():
                remove_temporaries(target)
            raise
        summary.seconds = time.perf_counter() - started
        progress.message(summary_line(summary, workers=len(self.number)))
        return summary
