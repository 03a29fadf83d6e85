"""Requests whose bytes are not a valid message: INVALID_ARGUMENT naming the problem.

grpc deserializes a request before the handler runs; a deserializer that raises makes
the call end UNKNOWN ("Unexpected DecodeError"). ``MalformedRequests`` is a server
interceptor that gives every handler a deserializer that never raises: bytes protobuf
refuses become a ``Malformed`` value, and the handler it wraps aborts such a call with
INVALID_ARGUMENT before the servicer sees it. protobuf's own error does not say which
field is at fault, so ``locate`` walks the wire format along the message's descriptor
and names it the way validation does (``prompt: invalid UTF-8 ...``,
``stopping.stop[1]: ...``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = range(6)


@dataclass(frozen=True)
class Malformed:
    """What the deserializer returns for bytes that do not parse: the problem, in words."""

    message: str


class WireError(ValueError):
    """The bytes break the protobuf wire format (truncated, a bad tag or wire type)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise WireError(f"truncated varint at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"varint longer than 10 bytes at byte {pos}")


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    """The position after a value of ``wire_type`` starting at ``pos``."""
    if wire_type == VARINT:
        return _varint(data, pos)[1]
    sizes = {FIXED64: 8, FIXED32: 4}
    if wire_type in sizes:
        end = pos + sizes[wire_type]
    elif wire_type == LENGTH:
        size, pos = _varint(data, pos)
        end = pos + size
    else:
        raise WireError(f"unsupported wire type {wire_type} at byte {pos}")
    if end > len(data):
        raise WireError(f"a field runs past the end of the message (byte {end} of {len(data)})")
    return end


def locate(descriptor: Descriptor, data: bytes, path: str = "") -> str | None:
    """The first problem in ``data`` read as a ``descriptor`` message, as
    ``"<field path>: <problem>"``; None when the walk finds none."""
    pos, counts = 0, {}
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        start = pos
        pos = _skip(data, pos, wire_type)
        field = descriptor.fields_by_number.get(number)
        if field is None or wire_type != LENGTH:
            continue
        name = f"{path}{field.name}"
        if field.is_repeated:
            counts[number] = counts.get(number, -1) + 1
            name = f"{name}[{counts[number]}]"
        value = data[_varint(data, start)[1]:pos]
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"{name}: invalid UTF-8 (byte {exc.start} of the string); a string field " \
                       "holds UTF-8 text"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if (found := locate(field.message_type, value, f"{name}.")) is not None:
                return found
    return None


def explain(descriptor: Descriptor, data: bytes, error: DecodeError) -> str:
    """Why ``data`` is not a ``descriptor`` message, naming the field when one is at fault."""
    try:
        found = locate(descriptor, data)
    except WireError as exc:
        return f"request: not a {descriptor.full_name} message: {exc}"
    except Exception:  # noqa: BLE001 - the walk only refines protobuf's own message
        found = None
    if found is not None:
        return found
    return f"request: not a {descriptor.full_name} message: {error}"


def tolerant(message_class) -> Callable[[bytes], object]:
    """A deserializer for ``message_class`` that returns ``Malformed`` instead of raising."""

    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Malformed(explain(message_class.DESCRIPTOR, data, exc))

    return deserialize


def _guarded(behaviour):
    """``behaviour`` preceded by the check: a ``Malformed`` request ends INVALID_ARGUMENT."""
    if inspect.isasyncgenfunction(behaviour):     # a handler that yields its replies
        async def replies(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            inner = behaviour(request, context)
            try:
                async for reply in inner:
                    yield reply
            finally:
                await inner.aclose()

        return replies

    async def call(request, context):             # a reply, or replies through context.write
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return call


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Every unary-request handler gets a ``tolerant`` deserializer, and a call whose bytes
    do not parse ends INVALID_ARGUMENT with ``explain``'s message. Put it after the
    interceptors that may refuse a call (API keys): a refusal is decided first."""

    def __init__(self, message_classes: dict[str, type]) -> None:
        self._classes = dict(message_classes)    # full method name -> request message class

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        message_class = self._classes.get(handler_call_details.method)
        if handler is None or message_class is None or handler.request_streaming:
            return handler
        kwargs = dict(request_deserializer=tolerant(message_class),
                      response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_guarded(handler.unary_stream), **kwargs)
        return grpc.unary_unary_rpc_method_handler(_guarded(handler.unary_unary), **kwargs)


def request_classes(*pb_modules) -> dict[str, type]:
    """``/package.Service/Method`` -> its request message class, for every method of the
    services of the generated ``*_pb2`` modules ``pb_modules``."""
    classes = {}
    for module in pb_modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                classes[f"/{service.full_name}/{method.name}"] = GetMessageClass(method.input_type)
    return classes
