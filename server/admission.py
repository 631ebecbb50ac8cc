"""Admission control: the RPCs in flight and the bytes they hold are bounded, so no mix of clients can grow the
server's memory without limit.

Every FastAdapt RPC is admitted when it enters the service (after gRPC decoded it, before validation) and leaves
when it answers, whatever happened in between: validation, the batcher's queue, the engine. Over either bound the
RPC is answered RESOURCE_EXHAUSTED naming the bound and its flag, at once, and holds nothing. Health checks and
reflection are not counted (probes must answer while the server is saturated).

The bytes counted are the request's serialized size: the decoded arrays are views of those bytes, and the
preprocessed float32 copy on the engine's device is at most 4x a uint8 request (counted by --max-inflight-bytes
being sized for it: see `default_inflight_bytes`).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from server.status import ResourceExhausted

DEFAULT_MAX_RPCS = 256


def default_inflight_bytes() -> int:
    """An eighth of physical memory (a uint8 request becomes ~4x that once preprocessed), at least 256 MiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return max(256 << 20, physical // 8)


class Admission:
    """Counts RPCs and request bytes in flight; `admit(rpc, nbytes)` is a context manager that refuses or holds."""

    def __init__(self, max_rpcs: int = DEFAULT_MAX_RPCS, max_bytes: int | None = None):
        max_bytes = default_inflight_bytes() if max_bytes is None else int(max_bytes)
        if max_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs={max_rpcs}, expected >= 1")
        if max_bytes < 1:
            raise ValueError(f"max_inflight_bytes={max_bytes}, expected >= 1")
        self.max_rpcs, self.max_bytes = int(max_rpcs), max_bytes
        self.rpcs = 0
        self.bytes = 0
        self.refused = 0
        self._lock = threading.Lock()

    @contextmanager
    def admit(self, rpc: str, nbytes: int):
        with self._lock:
            if self.rpcs >= self.max_rpcs:
                self.refused += 1
                raise ResourceExhausted(
                    f"{self.rpcs} RPCs are in flight, the limit is {self.max_rpcs} (--max-concurrent-rpcs); "
                    f"{rpc} was not started, retry later"
                )
            if self.bytes + nbytes > self.max_bytes:
                self.refused += 1
                raise ResourceExhausted(
                    f"requests in flight hold {self.bytes} bytes and this {rpc} request {nbytes} bytes, the limit is "
                    f"{self.max_bytes} bytes (--max-inflight-bytes); retry later"
                )
            self.rpcs += 1
            self.bytes += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.rpcs -= 1
                self.bytes -= nbytes
