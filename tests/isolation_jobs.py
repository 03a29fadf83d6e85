"""Run on every rank of a real multi-process group by ``tests/test_row_failure.py``
(module level, so spawned processes can import it): decode a batch in which one row's
sampling raises on rank 0, and report what each rank's batch held at every step."""

from __future__ import annotations

from model.engine import Batch, Engine, RequestState
from model.prompt import Blank
from model.runner import load_model
from model.sampling import Sampler, SamplingParams

POISON = 666          # the seed of the row whose sampling raises


def _poisoned_sample(fail_at: int):
    plain = Sampler.choose

    def sample(self, logits, prompt_ids, output_ids):
        for seed, out in zip(self.seeds, output_ids):
            if seed == POISON and len(out) >= fail_at:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return plain(self, logits, prompt_ids, output_ids)

    return sample


def decode_with_a_failing_row(ctx, checkpoint: str, rows: list[tuple[list[int], dict]], max_new: int,
                              fail_at: int):
    """Every rank: the row ids of its batch after each step, the ids it failed, and (rank 0)
    the tokens of each row."""
    plain = Sampler.choose
    Sampler.choose = _poisoned_sample(fail_at)
    try:                                  # a single rank runs in the caller's process: undo the patch
        return _decode(ctx, checkpoint, rows, max_new)
    finally:
        Sampler.choose = plain


def _decode(ctx, checkpoint: str, rows: list[tuple[list[int], dict]], max_new: int):
    engine = Engine(load_model(checkpoint, ctx))
    batch = Batch(1, [RequestState(i, Blank.first(ids), SamplingParams(**params), max_new)
                      for i, (ids, params) in enumerate(rows)])
    step = engine.prefill(batch)
    held, failed, tokens = [], [], {}
    while True:
        failed += [f.request.id for f in step.failed]
        for t in step.tokens:
            tokens.setdefault(t.request.id, []).append(t.token_id)
        held.append(step.batch.request_ids if step.batch is not None else [])
        if step.batch is None:
            return held, failed, tokens if ctx.rank == 0 else None
        step = engine.decode(step.batch)
