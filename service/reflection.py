"""Server reflection, v1 beside v1alpha.

grpcio-reflection implements only `grpc.reflection.v1alpha.ServerReflection`
(grpc/grpc#38576), and tools that speak only v1 get UNIMPLEMENTED from it. The v1
protocol is the v1alpha one under a new package name: the same messages with the
same field numbers, so the same bytes on the wire. So the stock servicer also
answers `grpc.reflection.v1.ServerReflection/ServerReflectionInfo`, and the v1
file (`grpc/reflection/v1/reflection.proto`, built from v1alpha's descriptor with
the package renamed) is added to the descriptor pool, so that reflection can
describe the v1 service too.
"""

from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME
METHOD = "ServerReflectionInfo"


def v1_file_descriptor(pool: descriptor_pool.DescriptorPool | None = None):
    """The v1 reflection file in `pool` (default pool), added once from v1alpha's descriptor."""
    pool = pool or descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type, method.output_type = (method.input_type.replace(old, new),
                                                 method.output_type.replace(old, new))
    pool.Add(proto)
    return pool.FindFileByName(V1_FILE)


def enable_reflection(server: grpc.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for `service_names` (and for itself) under v1alpha and v1."""
    v1_file_descriptor()
    servicer = reflection.ReflectionServicer(tuple(service_names) + (V1ALPHA_SERVICE, V1_SERVICE))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {METHOD: v1}),))
