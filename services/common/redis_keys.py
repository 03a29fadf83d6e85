"""Every Redis key of the system, with its meaning and lifetime (``docs/architecture.md``,
"Redis contract").

All keys start with ``glm:`` and are built here, and only here, from escaped parts:
``part`` percent-encodes the UTF-8 bytes of everything outside ``[A-Za-z0-9._-]``
(``:`` becomes ``%3A``, ``%`` itself ``%25``, glob characters too), so a part never
holds the separator ``:`` and two different values never give the same part. A key is
therefore read unambiguously: ``glm:req:{part}`` and ``glm:req:{part}:events`` belong to
one request, whatever text its id holds, and no id spells another request's key.

A request's id inside the system is namespaced by its tenant (``namespaced``):
``{tenant}/{request_id}``, where the tenant is ``anonymous`` without API keys, else
the first 16 hex digits of the SHA-256 of the caller's API key
(``services.gateway.auth.tenant_of``). The caller only ever sees its own
``request_id``; two tenants using the same id make two requests.

Payloads are JSON documents described in ``services.common.messages``; each stream
entry stores its document under the single field ``d``.

=============================  ======  =================================================  ===========
key                            type    meaning                                            lifetime
=============================  ======  =================================================  ===========
glm:queue:{model}              stream  requests waiting for a pool; consumer group        trimmed as
                                       ``pools``, one consumer per pool; an entry is      entries are
                                       XACKed and XDELeted when its request ends          acked
glm:req:{id}                   string  idempotency record: the request's fingerprint      ACTIVE_TTL,
                                       (SET NX by the gateway before XADD)                RESULT_TTL
glm:req:{id}:events            stream  token deltas (with sequence numbers), then one     after the end
                                       final or error event; read by the gateway with     (ACTIVE_TTL
                                       blocking XREAD, by a resuming pool with XRANGE     while alive)
glm:req:{id}:cancel            string  set by the gateway when the caller goes away;      CANCEL_TTL
                                       read by the scheduler every step
glm:dead:{model}               stream  requests that failed MAX_DELIVERIES times          DEAD_MAXLEN
                                       (poison), with the reason                          entries
glm:pool:{pool}                hash    a pool's heartbeat: model, capacity, running,      POOL_TTL,
                                       updated_at                                         refreshed
=============================  ======  =================================================  ===========

``{model}``, ``{id}`` and ``{pool}`` stand for ``part(...)`` of the model name, the
namespaced request id and the pool id.
"""

from __future__ import annotations

import re

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

ANONYMOUS = "anonymous"      # the one tenant of a gateway without API keys
TENANT_SEPARATOR = "/"       # never in a tenant name: ``namespaced`` is one-to-one
SAMPLE_SEPARATOR = "#"       # sample i of request r (GenerateRequest.n) is r#i: never in a caller's request_id
SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ALL_SAFE = re.compile(r"[A-Za-z0-9._-]*")


def part(text: str) -> str:
    """``text`` as one key part: every UTF-8 byte outside ``[A-Za-z0-9._-]`` as ``%XX``.

    One-to-one (``urllib.parse.unquote`` reverses it), and never holds ``:``."""
    if _ALL_SAFE.fullmatch(text):
        return text                  # the usual case (ids, model names), without the byte loop
    return "".join(chr(b) if b in SAFE else f"%{b:02X}" for b in text.encode("utf-8"))


def namespaced(tenant: str, request_id: str) -> str:
    """The system's id of a caller's ``request_id`` within ``tenant``."""
    if not tenant or TENANT_SEPARATOR in tenant:
        raise ValueError(f"tenant {tenant!r}: must be non-empty, without {TENANT_SEPARATOR!r}")
    return f"{tenant}{TENANT_SEPARATOR}{request_id}"


def caller_id(request_id: str) -> str:
    """The caller's own ``request_id`` of a namespaced id (what the caller is shown)."""
    return request_id.partition(TENANT_SEPARATOR)[2] or request_id


def queue(model: str) -> str:
    return f"{PREFIX}queue:{part(model)}"


def request(request_id: str) -> str:
    return f"{PREFIX}req:{part(request_id)}"


def events(request_id: str) -> str:
    return f"{request(request_id)}:events"


def cancel(request_id: str) -> str:
    return f"{request(request_id)}:cancel"


def dead_letter(model: str) -> str:
    return f"{PREFIX}dead:{part(model)}"


def pool(pool_id: str) -> str:
    return f"{PREFIX}pool:{part(pool_id)}"


def pool_pattern() -> str:
    return f"{PREFIX}pool:*"
