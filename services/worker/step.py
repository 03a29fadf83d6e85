"""One token for every row of a batch: rank 0 chooses, every rank applies.

After a forward, every rank holds the full-vocabulary logits of the last slot.
Rank 0 alone samples (``model.sampling.Sampler``, one seeded generator per row)
and broadcasts the chosen ids; every rank then appends the *broadcast* ids to
its requests, so the ranks' batch states cannot diverge. Finished rows (eop/eos,
or their token limit) leave the batch here; rank 0 also builds the
``Generation`` messages (others return none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import END_IDS
from model.parallel import ParallelContext
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.batch import ShardBatch


@dataclass
class StepResult:
    batch: ShardBatch | None                  # the unfinished rows, or None
    generations: list[pb.Generation] = field(default_factory=list)
    chosen: list[tuple[int, int]] = field(default_factory=list)   # (request id, token), every rank


def choose_tokens(ctx: ParallelContext, batch: ShardBatch, logits: torch.Tensor) -> torch.Tensor:
    """Rank 0 samples ``[b]`` ids from ``logits [b, V]`` and broadcasts them."""
    reqs = batch.requests
    b, vocab = logits.shape
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    if ctx.rank == 0:
        ban = [len(r.generated) < r.min_new for r in reqs]
        scores = logits
        if any(ban):                                              # min_new_tokens: no end token yet
            scores = logits.clone()
            is_end = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            is_end[list(END_IDS)] = True
            scores[torch.tensor(ban, device=logits.device)[:, None] & is_end] = -float("inf")
        chosen, _ = batch.sampler.sample(scores, [list(r.blank.context) for r in reqs],
                                         [r.generated for r in reqs])
        tokens.copy_(chosen)
    return ctx.broadcast(tokens)


def _generations(batch: ShardBatch, logits: torch.Tensor, tokens: torch.Tensor,
                 finished: list[str | None]) -> list[pb.Generation]:
    raw = torch.log_softmax(logits.float(), dim=-1)                     # [b, V]
    logprobs = raw.gather(1, tokens[:, None])[:, 0].tolist()            # [b]
    top_n = max(r.top_n for r in batch.requests)
    top = raw.topk(top_n, dim=-1) if top_n else None
    reasons = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
               "length": pb.FINISH_REASON_LENGTH}
    out = []
    for row, req in enumerate(batch.requests):
        gen = pb.Generation(request_id=req.id, token_id=int(tokens[row]), logprob=logprobs[row],
                            finished=finished[row] is not None, finish_reason=reasons[finished[row]],
                            generated_tokens=len(req.generated))
        if top is not None and req.top_n:
            values, ids = top.values[row, : req.top_n].tolist(), top.indices[row, : req.top_n].tolist()
            gen.top_tokens.extend(pb.TopToken(token_id=i, logprob=v) for i, v in zip(ids, values))
        out.append(gen)
    return out


def apply_step(ctx: ParallelContext, batch: ShardBatch, logits: torch.Tensor) -> StepResult:
    """Choose, broadcast and apply one token per row; drop the rows that finished."""
    tokens = choose_tokens(ctx, batch, logits)
    ids = tokens.tolist()
    finished: list[str | None] = []
    for req, tok in zip(batch.requests, ids):
        req.generated.append(tok)
        if tok in END_IDS:
            finished.append("stop")
        elif len(req.generated) >= req.allowed:
            finished.append("length")
        else:
            finished.append(None)
    generations = _generations(batch, logits, tokens, finished) if ctx.rank == 0 else []
    batch.pending = tokens
    keep = [row for row, reason in enumerate(finished) if reason is None]
    rest = batch.rows(keep) if keep else None
    return StepResult(rest, generations, [(r.id, t) for r, t in zip(batch.requests, ids)])
