"""A pool's scheduler (``docs/architecture.md``, "Scheduler"): continuous batching over the shard protocol.

``text`` (incremental detokenization, stop texts), ``request`` (one request's
blanks and events), ``policy`` (admission, budget, per-step decisions) and
``resume`` (state rebuilt from a request's published events) are pure and
synchronous; ``queue`` (Redis) and ``loop`` (asyncio + gRPC + tracing) wrap
around them. No torch in this process.
"""
