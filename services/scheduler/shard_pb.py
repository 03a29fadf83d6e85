"""The scheduler's edge to the shard protocol (``docs/architecture.md``, "Shard protocol"):
its phases and batch views to ``shard.proto`` messages, and the workers' replies back
to the decision core's types. Nothing else in the scheduler touches protobuf."""

from __future__ import annotations

from services.common.messages import FinishReason
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.scheduler.ops import BatchView, PrefillOp
from services.scheduler.request import Gen

_REASONS = {pb.FINISH_REASON_STOP: FinishReason.STOP, pb.FINISH_REASON_LENGTH: FinishReason.LENGTH}


class PoolFailure(RuntimeError):
    """The workers failed; the pool stops and leaves its entries to another pool."""


def generations(reply) -> list[Gen]:
    return [Gen(g.request_id, g.token_id, g.logprob, tuple((t.token_id, t.logprob) for t in g.top_tokens),
                g.finished, _REASONS.get(g.finish_reason),
                tuple((tuple(c.token_ids), c.score) for c in g.candidates)) for g in reply.generations]


def failed_rows(reply) -> list[tuple[int, str]]:
    return [(f.request_id, f.message) for f in reply.failed]


def view_of(reply) -> BatchView | None:
    """The batch a reply names (None: none, or no row left). A batch without its
    ``width`` comes from a worker that predates it: the pool fails loudly."""
    if not reply.HasField("batch") or not reply.batch.request_ids:
        return None
    b = reply.batch
    if b.width < 1:
        raise PoolFailure(f"the workers sent batch {b.id} without its width (CachedBatch.width): "
                          "a worker older than this scheduler")
    return BatchView(b.id, tuple(b.request_ids), width=b.width, max_tokens=b.max_tokens,
                     rows=max(b.size, len(b.request_ids)))


def batch_pb(op: PrefillOp) -> pb.Batch:
    requests = []
    for r in op.requests:
        s = r.sampling
        sampling = pb.SamplingParameters(
            greedy=s.greedy, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, seed=s.seed)
        request = pb.Request(
            id=r.row_id, input_ids=r.input_ids, generated_ids=r.generated_ids, sampling=sampling,
            stopping=pb.StoppingCriteria(max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens),
            top_logprobs=r.top_logprobs, mask_position=r.mask_position, logprobs=r.logprobs)
        if r.beam is not None:
            b = r.beam
            request.beam.CopyFrom(pb.BeamParameters(
                num_beams=b.num_beams, length_penalty=b.length_penalty, no_repeat_ngram_size=b.no_repeat_ngram_size,
                deterministic=b.deterministic, seed=s.seed))
        requests.append(request)
    return pb.Batch(id=op.batch_id, requests=requests)


def cached_pb(v: BatchView) -> pb.CachedBatch:
    return pb.CachedBatch(id=v.id, request_ids=v.row_ids, size=v.rows, max_tokens=v.max_tokens, width=v.width)


def ahead_pb(batch_id: int) -> list[pb.CachedBatch]:
    """The batches of a Decode sent ahead: the one the step in flight returns, by id only."""
    return [pb.CachedBatch(id=batch_id)]
