"""The decode loop of --batching continuous: the engine (inference/engine.py) steps every
running sequence, and requests join and leave between any two steps.

    rank 0, main thread   ContinuousWorker.run: while sequences run, plan a step, broadcast
                          it, execute it; jobs of their own lane in between; else wait
    rank 0, HTTP thread   ContinuousWorker.submit: each prompt of a job becomes a sequence
                          of the engine (refused at once with a 400 or, queue full, a 503)
    other ranks           worker.follow: execute each broadcast step plan

A generation job's prompts are sequences of the engine; its future resolves when the last
of them finishes, and its listener hears each token as the engine picks it. Cancelling
the future (the client went away) aborts the job's sequences: they leave the batch at the
next step and their slots are free for the sequences waiting. Jobs the continuous batch
does not run, prompt scoring and self-speculative decoding, run in a lane of their own:
one engine call each (as --batching static), one at a time. A self-speculative job gives
way after each draft-and-verify round: the engine takes one step there (rank 0 broadcasts
("step", plan), or ("round", None) when nothing runs, and every rank does the same), so
the running sequences go on while it decodes.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Deque, Dict, List, Optional, Tuple

from megatron.early_exit.inference.engine import Engine, QueueFull, SequenceRequest
from megatron.early_exit.inference.exit_numbers import exit_numbers
from megatron.early_exit.inference.result import GenerationResult, TokenEvent
from megatron.early_exit.inference.sampling import SamplingParams
from megatron.early_exit.server.jobs import AnyJob, Job, cancelled_rows, run_job
from megatron.early_exit.server.worker import broadcast, synced


def runs_in_engine(job: AnyJob) -> bool:
    return isinstance(job, Job) and job.strategy.batchable


def row_sampling(sampling: SamplingParams, row: int) -> SamplingParams:
    """Prompt `row` of a sampled request draws from its own generator, seeded `seed + row`,
    as in `generate` (SamplingParams.make_generators): two equal prompts of one request get
    different samples, and each prompt the tokens it gets alone with that seed."""
    if sampling.greedy or row == 0:
        return sampling
    return dataclasses.replace(sampling, seed=sampling.seed + row)


class _Submission:
    """One job's sequences, gathered into one GenerationResult for its future."""

    def __init__(self, job: Job, future: Future, model, on_done):
        self.job, self.future, self.model, self.on_done = job, future, model, on_done
        rows = len(job.prompts)
        self.result = GenerationResult(
            [[] for _ in range(rows)],
            [[] for _ in range(rows)],
            [[] for _ in range(rows)],
            num_layers=model.config.num_layers,
            strategy=job.strategy.name,
        )
        if job.top_n > 0:
            self.result.top_tokens, self.result.top_logprobs = [[] for _ in range(rows)], [[] for _ in range(rows)]
        self.seq_ids: List[int] = []
        self.remaining = rows
        self.lock = threading.Lock()

    def listener(self, row: int, registry: Dict[int, "_Submission"]):
        def hear(event: TokenEvent, seq) -> None:
            if event.tokens and self.job.listener is not None:
                try:
                    self.job.listener(
                        TokenEvent(
                            row,
                            event.tokens,
                            exit_numbers(self.model, event.exit_layers),
                            event.logprobs,
                            event.top_tokens,
                            event.top_logprobs,
                            event.finished,
                        )
                    )
                except RuntimeError:  # its reply's event loop is gone: the sequence goes on until aborted
                    pass
            if event.finished:
                registry.pop(event.row, None)
                self._finish(row, seq)

        return hear

    def _finish(self, row: int, seq) -> None:
        res, mine = self.result, seq.result
        res.tokens[row], res.logprobs[row] = mine.tokens[0], mine.logprobs[0]
        res.exit_layers[row] = exit_numbers(self.model, mine.exit_layers[0])  # as requests name exits
        if res.top_tokens is not None:
            res.top_tokens[row], res.top_logprobs[row] = mine.top_tokens[0], mine.top_logprobs[0]
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.on_done()
            # Done already: cancelled (nobody waits) or failed by an earlier error.
            if not self.future.done() and self.future.set_running_or_notify_cancel():
                self.future.set_result(res)


class ContinuousWorker:
    def __init__(self, engine: Engine, model, heartbeat_seconds: float = 30.0, max_queued: int = 1024):
        self.engine, self.model = engine, model
        self.heartbeat_seconds, self.max_queued = heartbeat_seconds, max_queued
        self._lane: Deque[Tuple[AnyJob, Future]] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.busy = False
        self.served = 0
        self._submissions: Dict[int, "_Submission"] = {}  # by sequence id, while it runs or waits

    # -- the HTTP side --------------------------------------------------------------------

    def submit(self, job: AnyJob) -> Future:
        future: Future = Future()
        if not runs_in_engine(job):
            with self._ready:
                if len(self._lane) >= self.max_queued:
                    raise QueueFull(f"{len(self._lane)} requests are waiting (--max-queued-requests {self.max_queued})")
                self._lane.append((job, future))
                self._ready.notify()
            return future
        submission = _Submission(job, future, self.model, self._served_one)
        try:
            for row, prompt in enumerate(job.prompts):
                request = SequenceRequest(
                    tuple(prompt),
                    job.strategy,
                    row_sampling(job.sampling, row),
                    job.max_new_tokens,
                    job.stop_tokens,
                    job.top_n,
                )
                seq_id = self.engine.add(request, submission.listener(row, self._submissions))
                submission.seq_ids.append(seq_id)
                self._submissions[seq_id] = submission
        except BaseException:
            for seq_id in submission.seq_ids:
                self.engine.abort(seq_id)
            raise
        future.add_done_callback(lambda f: self._cancelled(f, submission))
        with self._ready:
            self._ready.notify()
        return future

    def _cancelled(self, future: Future, submission: _Submission) -> None:
        if future.cancelled():
            for seq_id in submission.seq_ids:
                self.engine.abort(seq_id)
            with self._ready:
                self._ready.notify()

    def _served_one(self) -> None:
        self.served += 1

    @property
    def queued(self) -> int:
        return self.engine.num_waiting + len(self._lane)

    @property
    def running(self) -> int:
        return self.engine.num_running

    def stop(self) -> None:
        self._stopping = True

    # -- the decode side (rank 0, main thread) --------------------------------------------------

    def run(self) -> None:
        last_broadcast = time.monotonic()
        while not self._stopping:
            lane = self._next_lane_job()
            if lane is not None:
                self._run_lane(*lane)
            elif self.engine.has_work:
                self.busy = True
                try:
                    self._step()
                finally:
                    self.busy = False
            else:
                with self._ready:
                    if not self._lane and not self.engine.has_work:
                        self._ready.wait(0.2)
                if time.monotonic() - last_broadcast > self.heartbeat_seconds:
                    broadcast(("ping", None))
                else:
                    continue
            last_broadcast = time.monotonic()
        broadcast(("stop", None))
        with self._ready:
            while self._lane:
                future = self._lane.popleft()[1]
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError("the server is shutting down"))

    def _step(self) -> None:
        """One step of the engine on every rank."""
        plan = self.engine.plan()
        try:
            broadcast(("step", plan))
            self.engine.execute(plan)
        except Exception as err:  # noqa: BLE001 -- the running requests get it; the server goes on
            traceback.print_exc()
            self._fail_running(err)

    def _between_rounds(self) -> None:
        """Between two rounds of a lane job: one engine step, or word that there is none."""
        if self.engine.has_work:
            self._step()
        else:
            broadcast(("round", None))

    def _fail_running(self, err: Exception) -> None:
        for seq in self.engine.reset():
            submission = self._submissions.pop(seq.seq_id, None)
            future = None if submission is None else submission.future
            if future is not None and not future.done() and future.set_running_or_notify_cancel():
                future.set_exception(err)

    def _next_lane_job(self) -> Optional[Tuple[AnyJob, Future]]:
        with self._ready:
            while self._lane:
                job, future = self._lane.popleft()
                if future.set_running_or_notify_cancel():
                    return job, future
        return None

    def _run_lane(self, job: AnyJob, future: Future) -> None:
        self.busy = True
        try:
            broadcast(("job", dataclasses.replace(job, listener=None, cancel=None)))
            result = run_job(
                self.model,
                job,
                on_tokens=job.listener,
                cancelled=synced(cancelled_rows([job])),
                between_rounds=self._between_rounds,
            )
        except BaseException as err:  # noqa: BLE001 -- the request gets the error
            future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        finally:
            self.busy = False
            self.served += 1
        future.set_result(result)
