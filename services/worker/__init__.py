"""One tensor-parallel rank of a pool: the shard gRPC server, its batch state,
the pool launcher and the fan-out client (``docs/architecture.md``, "Shard protocol")."""
