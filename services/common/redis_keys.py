"""Every Redis key of the system, with its meaning and lifetime (``docs/architecture.md``,
"Redis contract").

All keys start with ``glm:``. Payloads are JSON documents described in
``services.common.messages``; each stream entry stores its document under the
single field ``d``.

=============================  ======  =================================================  ===========
key                            type    meaning                                            lifetime
=============================  ======  =================================================  ===========
glm:queue:{model}              stream  requests waiting for a pool; consumer group        trimmed as
                                       ``pools``, one consumer per pool; an entry is      entries are
                                       XACKed and XDELeted when its request ends          acked
glm:req:{id}                   string  idempotency record: the request's fingerprint      RESULT_TTL
                                       (SET NX by the gateway before XADD)
glm:req:{id}:events            stream  token deltas (with sequence numbers), then one     RESULT_TTL
                                       final or error event; read by the gateway with     after the end
                                       blocking XREAD, by a resuming pool with XRANGE
glm:req:{id}:cancel            string  set by the gateway when the caller goes away;      CANCEL_TTL
                                       read by the scheduler every step
glm:dead:{model}               stream  requests that failed MAX_DELIVERIES times          DEAD_MAXLEN
                                       (poison), with the reason                          entries
glm:pool:{pool}                hash    a pool's heartbeat: model, capacity, running,      POOL_TTL,
                                       updated_at                                         refreshed
=============================  ======  =================================================  ===========
"""

from __future__ import annotations

PREFIX = "glm:"
GROUP = "pools"              # the consumer group of every request stream
FIELD = "d"                  # the one field of every stream entry (a JSON document)

# Idempotency record and event stream, after the request ends (``glm scheduler
# --result-ttl-s``). Memory held = finishing rate x RESULT_TTL_S x size: ~5 KB a request
# (~15 KB with logprobs), so 600 s at 100 requests/s is 300 MB (900 MB with logprobs),
# inside the manifests' 1 GB maxmemory (docs/deploy.md).
RESULT_TTL_S = 600
ACTIVE_TTL_S = 24 * 3600     # the same keys while the request is alive (set once, at its first event)
CANCEL_TTL_S = 3600
POOL_TTL_S = 15              # a pool that stops refreshing its heartbeat disappears
DEAD_MAXLEN = 10_000
MAX_DELIVERIES = 3           # a request delivered this many times without ending is poison
CLAIM_IDLE_MS = 10_000       # a pending entry idle this long belongs to a dead pool


def queue(model: str) -> str:
    return f"{PREFIX}queue:{model}"


def request(request_id: str) -> str:
    return f"{PREFIX}req:{request_id}"


def events(request_id: str) -> str:
    return f"{PREFIX}req:{request_id}:events"


def cancel(request_id: str) -> str:
    return f"{PREFIX}req:{request_id}:cancel"


def dead_letter(model: str) -> str:
    return f"{PREFIX}dead:{model}"


def pool(pool_id: str) -> str:
    return f"{PREFIX}pool:{pool_id}"


def pool_pattern() -> str:
    return f"{PREFIX}pool:*"
