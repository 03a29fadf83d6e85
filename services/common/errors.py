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


class InvalidArgument(ServiceError, ValueError):
    """The call itself is wrong (unknown id, bad value, malformed prompt)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


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
