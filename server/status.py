"""Request errors and the interceptor that turns them into gRPC status codes, with per-RPC metrics and access logs.

The service raises RequestError subclasses, each carrying its status code and a message that names the field, the
value and what was expected, so a client can act on it. The interceptor answers them with that code; a malformed
tensor is INVALID_ARGUMENT; anything else is INTERNAL (logged with its traceback). A cancelled call (client cancel
or deadline) is recorded as CANCELLED / DEADLINE_EXCEEDED and its cancellation propagates.

Every status message and access-log line stays short whatever the client sent: strings from the client are echoed
through `clip` (a short prefix), and a message is cut to MAX_DETAILS_BYTES. The interceptor also admits each RPC
(server.admission) before the service sees it.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from server.telemetry import ServerMetrics, get_logger
from server.wire import SERVICE_NAME, TensorFormatError

MAX_DETAILS_BYTES = 1000  # a status message (and its log line's `details`) is at most this long
ECHO_CHARS = 64  # how much of a client's string an error message repeats


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """repr() of a client's string, cut to a short prefix that says how long the whole was."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def bounded(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return data[: limit - 30].decode("utf-8", "ignore") + f" ... [{len(data)} bytes, cut]"


class RequestError(Exception):
    """A request the server refuses; `code` is the gRPC status it is answered with."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(RequestError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(RequestError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RequestError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(RequestError):
    """A failure inside the server that is this one request's own (its batch-mates were served)."""

    code = grpc.StatusCode.INTERNAL


_PREFIX = f"/{SERVICE_NAME}/"


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary FastAdapt method; health and reflection pass through untouched."""

    def __init__(self, metrics: ServerMetrics, admission=None):
        self._metrics = metrics
        self._admission = admission
        self._log = get_logger()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(_PREFIX):
            return handler
        rpc = method[len(_PREFIX) :]
        inner = handler.unary_unary

        async def guarded(request, context):
            start = time.perf_counter()
            code, details = grpc.StatusCode.OK, ""
            try:
                if self._admission is None:
                    return await inner(request, context)
                with self._admission.admit(rpc, request.ByteSize()):
                    return await inner(request, context)
            except RequestError as exc:
                code, details = exc.code, exc.message
            except TensorFormatError as exc:
                code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as exc:
                code, details = grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(exc).__name__}: {exc}"
                self._log.exception("internal error", extra={"rpc": rpc})
            finally:
                details = bounded(details)
                seconds = time.perf_counter() - start
                self._metrics.observe_rpc(rpc, code.name, seconds)
                fields = {"rpc": rpc, "code": code.name, "ms": round(seconds * 1e3, 3), "peer": context.peer()}
                if details:
                    fields["details"] = details
                self._log.info("rpc", extra=fields)
            await context.abort(code, details)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
