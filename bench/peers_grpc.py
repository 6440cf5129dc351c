"""gRPC (grpc.aio) with a generic unary handler and msgpack serializers.

No protobuf and no generated code: the request and reply are the same
msgpack values the floor carries, so the comparison is about the transport
and the call machinery, not about the serialization format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import msgpack

from bench.procs import HOST

KIND = "async"
# grpc.aio drives its own completion queue from the default asyncio loop;
# that is how grpc users run it, so uvloop is not forced on it.
UVLOOP = False

_SERVICE = "bench.Echo"
_METHOD = f"/{_SERVICE}/Echo"

# The idle-connection scenario sends an 8 MiB message, above gRPC's default
# 4 MiB receive limit.  Proxies are disabled so that nothing but loopback is
# ever contacted, whatever the environment says.
_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_http_proxy", 0),
]


async def _echo(request: Any, context: grpc.aio.ServicerContext) -> Any:
    return request


async def serve(ready: Callable[[int], None], params: dict[str, Any]) -> None:
    server = grpc.aio.server(options=_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo,
                request_deserializer=msgpack.unpackb,
                response_serializer=msgpack.packb,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    ready(port)
    await server.wait_for_termination()


class GrpcConn:
    """One channel = one HTTP/2 connection (a private subchannel pool ensures it)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub = channel.unary_unary(
            _METHOD,
            request_serializer=msgpack.packb,
            response_deserializer=msgpack.unpackb,
        )

    def call(self, payload: bytes) -> Any:
        return self._stub(payload)

    async def close(self) -> None:
        await self._channel.close()


async def connect(port: int, params: dict[str, Any]) -> GrpcConn:
    # Without a local subchannel pool, channels to the same target share one
    # TCP connection, and "200 idle connections" would be one.
    channel = grpc.aio.insecure_channel(
        f"{HOST}:{port}", options=[*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    )
    await channel.channel_ready()
    return GrpcConn(channel)
