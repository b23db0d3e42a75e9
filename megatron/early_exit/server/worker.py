"""The decode loop: rank 0 takes jobs from a queue in arrival order and broadcasts each
one; every rank runs the same engine call.

    rank 0, main thread   Worker.run: wait for jobs; merge the compatible ones at the head of
                          the queue (up to --max-batch-size prompts); broadcast; generate;
                          hand each request its rows through a future
    rank 0, HTTP thread   Worker.submit (from the request handlers), never blocked by decoding
    other ranks           follow(): receive, generate, repeat until told to stop

Messages are ("job", Job or ScoreJob), ("step", a StepPlan of the continuous engine), ("round", None)
(no step between two rounds of a job: continuous.py), ("ping", None) and ("stop", None),
sent with
torch.distributed.broadcast_object_list. A job's listener stays on rank 0: the engine calls
it there as each step's tokens are picked, routed to the request that owns the row, so a
streamed reply sends each token when it is decoded while its batch goes on. An idle rank 0 pings every
`heartbeat_seconds`,
so that the other ranks, waiting in a broadcast, never reach the process group's timeout.
A job the engine refuses (InferenceConfigError) is refused on every rank alike, before
any collective, so the ranks stay in step; rank 0 answers it with a 400.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Callable, Deque, List, Optional, Tuple

import torch

from megatron.early_exit.inference import InferenceConfigError
from megatron.early_exit.inference.engine import QueueFull  # noqa: F401 -- raised by submit
from megatron.early_exit.server.jobs import AnyJob, cancelled_rows, merge_jobs, route_tokens, run_job, split_result


def broadcast(message: Optional[Tuple[str, object]] = None) -> Tuple[str, object]:
    """Send `message` from rank 0 (or receive it on the others)."""
    box = [message]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def synced(local: Optional[Callable[[], List[int]]]) -> Optional[Callable[[], List[int]]]:
    """Rank 0's cancelled rows on every rank (one broadcast per decode step when several
    ranks decode, so that they drop the same rows); `local` is None on the other ranks."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return local
    return lambda: broadcast(list(local()) if local is not None else [])


class Worker:
    def __init__(self, model, max_batch_size: int, max_queued: int = 1024, heartbeat_seconds: float = 30.0):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.heartbeat_seconds = heartbeat_seconds
        self._queue: Deque[Tuple[AnyJob, Future]] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.busy = False
        self.running = 0  # rows of the engine call under way
        self.served = 0

    # -- the HTTP side --------------------------------------------------------------------

    def submit(self, job: AnyJob) -> Future:
        future: Future = Future()
        with self._ready:
            if len(self._queue) >= self.max_queued:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queued-requests {self.max_queued})")
            self._queue.append((job, future))
            self._ready.notify()
        return future

    @property
    def queued(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        self._stopping = True  # seen within a poll interval (also safe from a signal handler)

    # -- the decode side (rank 0, main thread) --------------------------------------------------

    def run(self) -> None:
        last_broadcast = time.monotonic()
        while not self._stopping:
            batch = self._next_batch(timeout=0.2)
            if not batch:
                if time.monotonic() - last_broadcast > self.heartbeat_seconds:
                    broadcast(("ping", None))
                    last_broadcast = time.monotonic()
                continue
            self._run_batch(batch)
            last_broadcast = time.monotonic()
        broadcast(("stop", None))
        with self._ready:
            while self._queue:
                future = self._queue.popleft()[1]
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError("the server is shutting down"))

    def _next_batch(self, timeout: float) -> List[Tuple[AnyJob, Future]]:
        """The head of the queue and the jobs right behind it that can share its engine call.
        Requests whose caller went away (a cancelled future) are dropped here; the others
        are marked running, so that they can no longer be cancelled under the decoder."""
        with self._ready:
            if not self._queue:
                self._ready.wait(timeout)
            while self._queue and not self._queue[0][1].set_running_or_notify_cancel():
                self._queue.popleft()
            if not self._queue:
                return []
            batch = [self._queue.popleft()]
            key, size = batch[0][0].batch_key, len(batch[0][0].prompts)
            while (
                key is not None
                and self._queue
                and self._queue[0][0].batch_key == key
                and size + len(self._queue[0][0].prompts) <= self.max_batch_size
            ):
                job, future = self._queue.popleft()
                if future.set_running_or_notify_cancel():
                    size += len(job.prompts)
                    batch.append((job, future))
            return batch

    def _run_batch(self, batch: List[Tuple[AnyJob, Future]]) -> None:
        jobs = [job for job, _ in batch]
        merged = merge_jobs(jobs)
        self.busy, self.running = True, merged.rows
        try:
            broadcast(("job", merged))
            result = run_job(self.model, merged, on_tokens=route_tokens(jobs), cancelled=synced(cancelled_rows(jobs)))
        except BaseException as err:  # noqa: BLE001 -- every waiting request gets the error
            for _, future in batch:
                future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        finally:
            self.busy, self.running = False, 0
            self.served += 1
        for (_, future), part in zip(batch, split_result(result, jobs)):
            future.set_result(part)


def follow(model, engine=None) -> None:
    """The loop of every rank but 0: run what rank 0 broadcasts until it says stop: an engine
    call ("job") or, with --batching continuous, a step of the engine ("step", its plan)."""
    while True:
        kind, job = broadcast()
        if kind == "stop":
            return
        if kind == "step":
            _execute(engine, job)
        elif kind == "job":
            # With the continuous engine, rank 0 steps it between a lane job's rounds.
            between_rounds = None if engine is None else functools.partial(_follow_round, engine)
            try:
                run_job(model, job, cancelled=synced(None), between_rounds=between_rounds)
            except InferenceConfigError:
                pass  # refused on rank 0 too, which answers the request
            except Exception:  # noqa: BLE001 -- rank 0 answers 500 and goes on; so does this rank
                traceback.print_exc()


def _execute(engine, plan) -> None:
    try:
        engine.execute(plan)
    except Exception:  # noqa: BLE001 -- rank 0 failed the same step: both drop its sequences
        traceback.print_exc()
        engine.reset()


def _follow_round(engine) -> None:
    """Between two rounds of a lane job: the step rank 0 took there, if any."""
    kind, plan = broadcast()
    if kind == "step":
        _execute(engine, plan)
