"""Exec probe of a pool's worker container: every rank answers ShardService.Health.

The ranks serve the shard protocol over unix sockets only (no TCP port, no
grpc.health.v1 service), which kubelet's grpc/tcp probes cannot reach, so this
script calls each rank's Health RPC with the generated stub. It reads the
settings of ``glm pool`` in the same container (``GLM_TP``, ``GLM_SOCKET_DIR``).
Exit 0 when all ``GLM_TP`` ranks answer; exit 1 naming the first that does not (not started yet,
or broken after a failed collective: UNAVAILABLE).
"""

from __future__ import annotations

import os
import sys

import grpc

from services.proto_gen.glm.v1 import shard_pb2, shard_pb2_grpc

TIMEOUT_S = 5.0


def main() -> int:
    tp = int(os.environ["GLM_TP"])
    sockets = os.environ.get("GLM_SOCKET_DIR", "/run/glm")
    for rank in range(tp):
        address = f"unix://{sockets}/rank-{rank}.sock"
        try:
            with grpc.insecure_channel(address) as channel:
                shard_pb2_grpc.ShardServiceStub(channel).Health(shard_pb2.HealthRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            print(f"rank {rank} ({address}): {exc.code().name}: {exc.details()}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
