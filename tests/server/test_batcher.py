"""server.batcher: coalescing, wait policies, per-request errors, cancellation and queue slots, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.batcher import DynamicBatcher
from server.status import ResourceExhausted, Unavailable


class Recorder:
    """A run_batch that records its calls; results are item * 10, or the item itself when it is an exception."""

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[tuple] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def __call__(self, key, items):
        self.calls.append((key, list(items)))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return [item if isinstance(item, Exception) else item * 10 for item in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_with_one_key_share_one_call_in_order():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_wait_s=0.05, wait_policy="fixed")
        out = await asyncio.gather(*(b.submit("k", i) for i in range(5)))
        await b.close()
        return rec, out

    rec, out = run(main())
    assert rec.calls == [("k", [0, 1, 2, 3, 4])]
    assert [o.result for o in out] == [0, 10, 20, 30, 40]
    assert all(o.batch_size == 5 for o in out)
    assert all(name.startswith("fastadapt-engine") for name in rec.threads)


def test_keys_are_not_mixed_and_max_batch_splits():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch=3, max_wait_s=0.05, wait_policy="fixed")
        await asyncio.gather(*(b.submit("a", i) for i in range(7)), *(b.submit("b", i) for i in range(2)))
        await b.close()
        return rec

    rec = run(main())
    sizes = sorted((key, len(items)) for key, items in rec.calls)
    assert sizes == [("a", 1), ("a", 3), ("a", 3), ("b", 2)]
    assert sorted(i for key, items in rec.calls if key == "a" for i in items) == list(range(7))


def test_adaptive_policy_waits_only_for_as_many_as_last_time():
    async def main():
        rec = Recorder(delay_s=0.1)
        b = DynamicBatcher(rec, max_wait_s=0.4, wait_policy="adaptive")
        first = await asyncio.gather(*(b.submit("k", i) for i in range(4)))  # 1 goes at once, 3 gather meanwhile
        second = await asyncio.gather(*(b.submit("k", i) for i in range(3)))  # 3 = last size: no waiting
        lone = await b.submit("k", 9)  # fewer than last time: waits max_wait for company
        after = await b.submit("k", 9)  # last size is 1 now: no wait
        await b.close()
        return rec, first, second, lone, after

    rec, first, second, lone, after = run(main())
    assert [len(items) for _, items in rec.calls] == [1, 3, 3, 1, 1]
    assert max(o.queue_s for o in second) < 0.3
    assert lone.queue_s >= 0.39
    assert after.queue_s < 0.3


def test_one_bad_item_fails_alone_and_a_failing_batch_fails_all():
    async def main():
        b = DynamicBatcher(Recorder(), max_wait_s=0.05, wait_policy="fixed")
        results = await asyncio.gather(b.submit("k", 1), b.submit("k", ValueError("bad")), b.submit("k", 3),
                                       return_exceptions=True)
        await b.close()

        def broken(key, items):
            raise RuntimeError("device lost")

        b2 = DynamicBatcher(broken, max_wait_s=0.05, wait_policy="fixed")
        failed = await asyncio.gather(b2.submit("k", 1), b2.submit("k", 2), return_exceptions=True)
        await b2.close()
        return results, failed

    results, failed = run(main())
    assert results[0].result == 10 and results[2].result == 30
    assert isinstance(results[1], ValueError)
    assert all(isinstance(f, RuntimeError) for f in failed)


def test_cancelled_request_leaves_its_group_and_frees_its_slot():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_wait_s=5.0, wait_policy="fixed", max_queue=2)
        t1 = asyncio.ensure_future(b.submit("k", 1))
        t2 = asyncio.ensure_future(b.submit("k", 2))
        await asyncio.sleep(0.02)
        with pytest.raises(ResourceExhausted, match="limit is 2"):
            await b.submit("k", 3)
        t1.cancel()
        await asyncio.sleep(0.02)
        queued_after_cancel = b.queued
        t3 = asyncio.ensure_future(b.submit("k", 4))  # the freed slot takes a new request
        await asyncio.sleep(0.02)
        await b.close()  # flushes what is pending without waiting out max_wait
        return rec, queued_after_cancel, await t2, await t3, t1

    rec, queued_after_cancel, r2, r4, t1 = run(main())
    assert queued_after_cancel == 1
    assert t1.cancelled()
    assert rec.calls == [("k", [2, 4])]
    assert (r2.result, r4.result) == (20, 40)


def test_exclusive_work_runs_on_the_worker_between_batches_and_close_refuses_new_work():
    async def main():
        rec = Recorder(delay_s=0.05)
        b = DynamicBatcher(rec, max_wait_s=0.0, wait_policy="fixed")
        batch = asyncio.ensure_future(b.submit("k", 1))
        await asyncio.sleep(0.01)
        name = await b.run_exclusive(lambda: threading.current_thread().name)
        await batch
        await b.close()
        with pytest.raises(Unavailable, match="shutting down"):
            await b.submit("k", 2)
        return name

    assert run(main()).startswith("fastadapt-engine")


@pytest.mark.parametrize("kwargs,match", [
    ({"max_batch": 0}, "max_batch=0"), ({"max_wait_s": -1}, "max_wait_s=-1"),
    ({"wait_policy": "greedy"}, "wait_policy='greedy'"), ({"max_queue": 0}, "max_queue=0"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicBatcher(Recorder(), **kwargs)


def test_exclusive_jobs_take_queue_slots_and_alternate_with_batches():
    """A stream of exclusive jobs (exports) cannot starve batches: after each exclusive job a due batch goes."""

    async def main():
        order: list[str] = []
        rec = Recorder(delay_s=0.02)

        def export(i):
            order.append(f"export{i}")
            time.sleep(0.02)
            return i

        def batch(key, items):
            order.append(f"batch{items}")
            return rec(key, items)

        b = DynamicBatcher(batch, max_wait_s=0.0, wait_policy="fixed", max_queue=5)
        first = asyncio.ensure_future(b.run_exclusive(export, 0))  # occupies the worker
        await asyncio.sleep(0.005)
        exports = [asyncio.ensure_future(b.run_exclusive(export, i)) for i in (1, 2, 3)]
        batches = [asyncio.ensure_future(b.submit(f"k{i}", i)) for i in (1, 2)]
        await asyncio.sleep(0.005)
        queued = b.queued
        with pytest.raises(ResourceExhausted, match="limit is 5"):
            await b.submit("k9", 9)  # the three waiting exports count: the queue is full
        await asyncio.gather(first, *exports, *batches)
        await b.close()
        return order, queued

    order, queued = run(main())
    assert queued == 5  # three exports and two batch items hold queue slots
    assert order == ["export0", "batch[1]", "export1", "batch[2]", "export2", "export3"]
