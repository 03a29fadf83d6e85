"""Shared by the worker tests: prompts of mixed lengths and both mask kinds, request
builders, the reference generation (``model.generation.Generator``, what
``glm generate`` runs) and a driver that runs batches to completion."""

from __future__ import annotations

from model.generation import GenerationOptions, Generator
from model.prompt import Blank
from model.sampling import SamplingParams
from services.proto_gen.glm.v1 import shard_pb2 as pb

PROMPTS = {
    "mask": [20100, 20200, 150000, 20300, 20002],
    "gmask": [20500, 20600, 20700, 150001],
    "long_gmask": [20000 + 37 * i for i in range(15)] + [150001],
    "mid_mask": [21000, 150000, 21001, 21002, 21003, 21004, 21005, 20002],
}
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.3,
               frequency_penalty=0.2, seed=77)


def request(rid: int, ids: list[int], max_new: int = 6, *, generated=(), top_n: int = 0,
            min_new: int = 0, logprobs: bool = True, **sampling) -> pb.Request:
    params = sampling or {"greedy": True}
    return pb.Request(id=rid, input_ids=ids, generated_ids=list(generated), top_logprobs=top_n, logprobs=logprobs,
                      sampling=pb.SamplingParameters(**params),
                      stopping=pb.StoppingCriteria(max_new_tokens=max_new, min_new_tokens=min_new))


def mixed_batch(batch_id: int, first_id: int = 1) -> pb.Batch:
    """Four greedy requests of mixed lengths and mask kinds plus one sampled with every parameter."""
    reqs = [request(first_id + i, ids, max_new=5 + i) for i, ids in enumerate(PROMPTS.values())]
    reqs.append(request(first_id + 4, PROMPTS["gmask"], max_new=6, **SAMPLED))
    return pb.Batch(id=batch_id, requests=reqs)


def reference(model, req: pb.Request) -> list[int]:
    """Tokens ``Generator`` (batch 1, as ``glm generate --prompt-ids``) gives for ``req``."""
    s = req.sampling
    params = SamplingParams(greedy=s.greedy, temperature=s.temperature if s.HasField("temperature") else 1.0,
                            top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0,
                            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
                            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                            seed=s.seed if s.HasField("seed") else None)
    options = GenerationOptions(max_new_tokens=req.stopping.max_new_tokens,
                                min_new_tokens=req.stopping.min_new_tokens)
    return Generator(model).sample([Blank.first(list(req.input_ids))], [params], options)[0].token_ids


class Tokens:
    """Collects each request's tokens from Prefill/Decode replies."""

    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.finish: dict[int, int] = {}

    def add(self, reply) -> "pb.CachedBatch | None":
        for g in reply.generations:
            self.ids.setdefault(g.request_id, []).append(g.token_id)
            self.logprobs.setdefault(g.request_id, []).append(g.logprob)
            if g.finished:
                self.finish[g.request_id] = g.finish_reason
        return reply.batch if reply.HasField("batch") else None
