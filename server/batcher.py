"""Dynamic batching: concurrent requests with the same batch key become one engine call, on one worker thread.

The event loop only queues and dispatches; the engine runs on a single worker thread that owns the device, so the
loop keeps accepting requests while a batch computes. A batch key (model, support size, steps, lr, ...) groups
requests whose tasks can be task-stacked into one call; each task keeps its own weights and batch-norm statistics,
so a task's result does not depend on which other tasks shared its batch.

When to dispatch (only while the worker is idle, so requests that arrive during a batch join the next one):
- `fixed`: a group goes when it holds `max_batch` requests or its oldest request has waited `max_wait_s`.
- `adaptive` (default): the size to wait for is the size of the key's previous batch (capped at `max_batch`), so a
  lone client never waits and N closed-loop clients are dispatched together as soon as all N are back; the oldest
  request never waits longer than `max_wait_s`.
A cancelled request (client cancel or deadline) leaves its group at once and frees its queue slot.
Exclusive jobs (`run_exclusive`: model loading, ONNX export) take queue slots like requests, and the worker
alternates: after an exclusive job, a due batch goes before the next exclusive job, so a stream of exports cannot
starve the batches (nor batches the exports).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from server.status import ResourceExhausted, Unavailable

WAIT_POLICIES = ("adaptive", "fixed")
LAST_SIZES_KEPT = 4096  # batch keys whose last batch size the adaptive policy remembers (least recent forgotten)


@dataclass(eq=False)
class _Waiting:
    item: Any
    future: asyncio.Future
    arrived: float


@dataclass(frozen=True)
class Batched:
    """One request's result and how it was batched."""

    result: Any
    queue_s: float  # from submit to dispatch
    batch_size: int  # requests that shared the engine call


class DynamicBatcher:
    """Coalesces `submit(key, item)` calls into `run_batch(key, items) -> results` on one worker thread.

    run_batch returns one result per item, in order; a result that is an exception is raised to that item's caller
    only. `run_exclusive(fn, *args)` runs any other device work on the same worker thread, between batches.
    """

    def __init__(
        self,
        run_batch: Callable[[Hashable, list], Sequence[Any]],
        *,
        max_batch: int = 256,
        max_wait_s: float = 0.001,
        wait_policy: str = "adaptive",
        max_queue: int = 4096,
        on_batch: Callable[[Hashable, int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}, expected >= 1")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s={max_wait_s}, expected >= 0")
        if wait_policy not in WAIT_POLICIES:
            raise ValueError(f"wait_policy={wait_policy!r}, expected one of {WAIT_POLICIES}")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}, expected >= 1")
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.wait_policy, self.max_queue = wait_policy, max_queue
        self._run_batch = run_batch
        self._on_batch = on_batch or (lambda key, size: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastadapt-engine",
                                            initializer=self._note_worker)
        self.worker_ident: int | None = None  # the worker thread's threading.get_ident(), once it started
        self._groups: dict[Hashable, list[_Waiting]] = {}  # insertion order = age order of each group's oldest
        self._exclusive: deque[tuple[Callable, tuple, asyncio.Future]] = deque()
        self._last_size: OrderedDict[Hashable, int] = OrderedDict()
        self._exclusive_last = False  # the previous dispatch was an exclusive job: a due batch goes next
        self._queued = 0
        self._busy = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches_run = 0

    def _note_worker(self) -> None:
        self.worker_ident = threading.get_ident()

    @property
    def queued(self) -> int:
        """Requests waiting for the engine (not yet dispatched)."""
        return self._queued

    @property
    def busy(self) -> bool:
        return self._busy

    def _admit(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down and takes no new work; retry on another replica")
        if self._queued >= self.max_queue:
            raise ResourceExhausted(
                f"{self._queued} requests are already queued for the engine, the limit is {self.max_queue} "
                "(--max-queue); retry later"
            )

    async def submit(self, key: Hashable, item: Any) -> Batched:
        self._admit()
        self._loop = asyncio.get_running_loop()
        waiting = _Waiting(item, self._loop.create_future(), time.perf_counter())
        self._groups.setdefault(key, []).append(waiting)
        self._queued += 1
        self._schedule()
        try:
            return await waiting.future
        except asyncio.CancelledError:
            self._withdraw(key, waiting)
            raise

    async def run_exclusive(self, fn: Callable, *args) -> Any:
        """Run fn(*args) on the worker thread (the device owner), between batches; it takes a queue slot."""
        self._admit()
        self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        self._exclusive.append((fn, args, future))
        self._queued += 1
        self._schedule()
        return await future

    async def close(self, poll_s: float = 0.005) -> None:
        """Refuse new work, finish everything queued or running, then stop the worker thread."""
        self._closed = True
        if self._loop is not None:
            self._schedule()
        while self._busy or self._groups or self._exclusive:
            await asyncio.sleep(poll_s)
        self._executor.shutdown(wait=True)

    def _withdraw(self, key: Hashable, waiting: _Waiting) -> None:
        group = self._groups.get(key)
        if group is not None and waiting in group:
            group.remove(waiting)
            self._queued -= 1
            if not group:
                del self._groups[key]
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy:
            return
        now = time.perf_counter()
        if self._exclusive_last and self._dispatch_due(now):
            return  # a batch was due while an exclusive job ran: it goes first
        if self._run_exclusive() or self._dispatch_due(now):
            return
        due = [group[0].arrived + self.max_wait_s for group in self._groups.values()]
        if due:
            self._timer = self._loop.call_later(max(0.0, min(due) - now), self._schedule)

    def _run_exclusive(self) -> bool:
        while self._exclusive:
            fn, args, future = self._exclusive.popleft()
            self._queued -= 1
            if future.done():
                continue
            self._busy, self._exclusive_last = True, True
            job = self._loop.run_in_executor(self._executor, fn, *args)
            job.add_done_callback(partial(self._exclusive_done, future))
            return True
        return False

    def _dispatch_due(self, now: float) -> bool:
        """Dispatch the oldest group that is due (full for its target size, waited max_wait_s, or closing: flush)."""
        for key, group in self._groups.items():
            target = self.max_batch
            if self.wait_policy == "adaptive":
                target = min(self.max_batch, self._last_size.get(key, 1))
            if len(group) >= target or now >= group[0].arrived + self.max_wait_s or self._closed:
                self._dispatch(key)
                return True
        return False

    def _dispatch(self, key: Hashable) -> None:
        group = self._groups.pop(key)
        take, rest = group[: self.max_batch], group[self.max_batch :]
        if rest:
            self._groups[key] = rest
        self._queued -= len(take)
        live = [w for w in take if not w.future.done()]
        if not live:
            self._schedule()
            return
        self._busy, self._exclusive_last = True, False
        self._last_size[key] = len(live)
        self._last_size.move_to_end(key)
        while len(self._last_size) > LAST_SIZES_KEPT:
            self._last_size.popitem(last=False)
        self.batches_run += 1
        self._on_batch(key, len(live))
        job = self._loop.run_in_executor(self._executor, self._run_batch, key, [w.item for w in live])
        job.add_done_callback(partial(self._batch_done, live, time.perf_counter()))

    def _batch_done(self, live: list[_Waiting], dispatched: float, job: asyncio.Future) -> None:
        self._busy = False
        try:
            error = job.exception()
            results = None if error is not None else list(job.result())
            if results is not None and len(results) != len(live):
                error = RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
            for i, waiting in enumerate(live):
                if waiting.future.done():
                    continue  # cancelled while it ran: the result is dropped
                outcome = error if error is not None else results[i]
                if isinstance(outcome, BaseException):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(Batched(outcome, dispatched - waiting.arrived, len(live)))
        finally:
            self._schedule()

    def _exclusive_done(self, future: asyncio.Future, job: asyncio.Future) -> None:
        self._busy = False
        try:
            if not future.done():
                error = job.exception()
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(job.result())
        finally:
            self._schedule()
