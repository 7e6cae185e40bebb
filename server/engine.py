"""One engine, many clients: requests run one at a time, in arrival order, on the loaded pipeline.

The pipeline decodes batch 1, so the engine is one worker thread (a single-thread executor, FIFO)
in front of it; the event loop only moves text.  A job streams its text pieces back to the loop
through an asyncio queue.  The queue in front of the engine is bounded: ``max_queue`` requests may
wait while one runs, the next one is refused (429).  A job whose client went away stops at the next
piece of text the pipeline yields (one accepted block), or is skipped if it had not started; every
generation resets the target's cache and the drafter (``SpeculativeDecoder.generate``), so the
next request starts clean."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from specrun.decode import Stats
from specrun.sampling import SamplingParams

from .metrics import Metrics

log = logging.getLogger("specrun.serve")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@attrs.frozen
class Outcome:
    text: str
    token_ids: list[int]
    stats: Stats
    queue_seconds: float
    cancelled: bool = False


@attrs.define(eq=False)
class Job:
    """One generation: what to run, and the queue its events go to (``("text", str)`` pieces, then
    ``("done", Outcome)`` or ``("error", exception)``)."""

    ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = attrs.field(factory=asyncio.Queue)
    cancelled: threading.Event = attrs.field(factory=threading.Event)
    enqueued: float = attrs.field(factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()


class Engine:
    def __init__(self, pipeline, *, max_queue: int, metrics: Metrics):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.pipeline, self.max_queue, self.metrics = pipeline, max_queue, metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specrun-engine")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self.waiting = 0
        self.running = 0
        self.closed = False

    def submit(self, job: Job) -> None:
        """Queue ``job`` (raises QueueFull when ``max_queue`` requests already wait behind a running one)."""
        with self._lock:
            if self.closed:
                raise ShuttingDown
            if len(self._jobs) > self.max_queue:
                raise QueueFull
            self._jobs.add(job)
            self.waiting += 1
            self._gauges()
        self._executor.submit(self._run, job)

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(self.running)

    def _run(self, job: Job) -> None:
        with self._lock:
            self.waiting -= 1
            self.running += 1
            self._gauges()
        queue_seconds = time.perf_counter() - job.enqueued
        self.metrics.queue_seconds.observe(queue_seconds)
        try:
            if job.cancelled.is_set():  # the client left while the request waited
                self.metrics.cancelled.inc()
                job.emit("done", Outcome("", [], Stats(stop_reason="cancelled"), queue_seconds, cancelled=True))
                return
            self.metrics.prompt_tokens.inc(len(job.ids))
            pipe = self.pipeline
            gen = pipe.stream(job.ids, max_new_tokens=job.max_new_tokens, sampling=job.sampling, stop=job.stop)
            cancelled = False
            try:
                for piece in gen:
                    job.emit("text", piece)
                    if job.cancelled.is_set():
                        cancelled = True
                        break
            finally:
                gen.close()
            if cancelled:
                stats = pipe.decoder.stats
                self.metrics.cancelled.inc()
                outcome = Outcome("", [], stats, queue_seconds, cancelled=True)
                generated = stats.new_tokens
            else:
                res = pipe.last
                outcome = Outcome(res.text, list(res.token_ids), res.stats, queue_seconds)
                generated = len(res.token_ids)
            self._observe(outcome.stats, generated)
            job.emit("done", outcome)
        except Exception as exc:
            if not isinstance(exc, _user_errors()):
                log.exception("generation failed")
            job.emit("error", exc)
        finally:
            with self._lock:
                self.running -= 1
                self._jobs.discard(job)
                self._gauges()

    def _observe(self, st: Stats, generated: int) -> None:
        m = self.metrics
        m.generated_tokens.inc(generated)
        if st.target_calls:
            m.acceptance_length.observe(st.acceptance_length)
        if st.decode_seconds > 0 and st.decode_tokens:
            m.tokens_per_second.observe(st.tokens_per_second)
        if st.prefill_seconds:
            m.time_to_first_token.observe(st.prefill_seconds)

    def shutdown(self) -> None:
        """Refuse new jobs, stop the running one at its next block; the waiting ones, cancelled too,
        each answer "cancelled" as they come up, so no handler waits forever."""
        with self._lock:
            self.closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self._executor.shutdown(wait=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from specrun.errors import SpecrunError

    return (SpecrunError,)
