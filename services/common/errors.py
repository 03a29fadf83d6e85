"""Errors that cross a service boundary, and the gRPC status each one maps to.

Raise these where the problem is found (validation, admission); the RPC edge
turns them into a status with the message intact (``abort_code``). Messages
name the field or id at fault, on one line.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class; ``code`` is the gRPC status the caller sees."""

    code = grpc.StatusCode.INTERNAL


# Trailing metadata of an INVALID_ARGUMENT from a worker's Prefill: the shard
# request id (decimal) of the request at fault, when one request is (see
# ``InvalidArgument.request_id``). The scheduler reads this, never the message.
REFUSED_REQUEST_METADATA = "glm-refused-request-id"


class InvalidArgument(ServiceError, ValueError):
    """The call itself is wrong (unknown id, bad value, malformed prompt).

    ``request_id``: the shard request id at fault when the problem is one request
    of a batch; the RPC edge sends it as ``REFUSED_REQUEST_METADATA``."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class ResourceExhausted(ServiceError):
    """Not enough room (KV capacity, memory, queue depth); retry later or smaller."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The service cannot serve any call now (e.g. a broken process group)."""

    code = grpc.StatusCode.UNAVAILABLE


def abort_code(exc: BaseException) -> grpc.StatusCode:
    return exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class FailedPrecondition(ServiceError):
    """The call is valid but comes at the wrong time (e.g. Prefill before Warmup)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
