"""Server reflection in both protocol versions: ``grpc.reflection.v1`` and ``v1alpha``.

Current clients (grpcurl, Postman, grpcui, recent ``grpc_cli``) ask for ``v1``
first and fall back to ``v1alpha``; older ones only know ``v1alpha``.
grpcio-reflection implements only ``v1alpha``. The two protocols' messages are
identical field for field (``protos/grpc/reflection/v1/reflection.proto``), so
``ReflectionV1Servicer`` serves ``v1`` by re-reading each request as its
``v1alpha`` twin, letting grpcio-reflection answer, and re-reading the answer as
a ``v1`` message: one implementation of the lookups, two service names.
"""

from __future__ import annotations

from typing import AsyncIterable, AsyncIterator, Iterable

import grpc
from grpc_reflection.v1alpha import reflection as reflection_v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb

from services.proto_gen.grpc.reflection.v1 import reflection_pb2 as v1_pb
from services.proto_gen.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc

V1ALPHA_SERVICE_NAME = reflection_v1alpha.SERVICE_NAME
V1_SERVICE_NAME = v1_pb.DESCRIPTOR.services_by_name["ServerReflection"].full_name


class ReflectionV1Servicer(v1_grpc.ServerReflectionServicer):
    """``grpc.reflection.v1.ServerReflection`` answered by grpcio-reflection's ``v1alpha`` code."""

    def __init__(self, service_names: Iterable[str], pool=None) -> None:
        self._alpha = reflection_v1alpha.aio.ReflectionServicer(tuple(service_names), pool=pool)

    async def ServerReflectionInfo(self, request_iterator: AsyncIterable[v1_pb.ServerReflectionRequest],
                                   context) -> AsyncIterator[v1_pb.ServerReflectionResponse]:
        async def as_alpha() -> AsyncIterator[alpha_pb.ServerReflectionRequest]:
            async for request in request_iterator:
                yield alpha_pb.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._alpha.ServerReflectionInfo(as_alpha(), context):
            yield v1_pb.ServerReflectionResponse.FromString(response.SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection ``v1`` and ``v1alpha`` on ``server``; both list ``service_names``
    and the two reflection services themselves."""
    names = tuple(dict.fromkeys((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)))
    reflection_v1alpha.enable_server_reflection(names, server)
    v1_grpc.add_ServerReflectionServicer_to_server(ReflectionV1Servicer(names), server)
