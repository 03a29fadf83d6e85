"""The block-paged KV cache (``model.paged_kv``): the packed one-forward step equals the
reference forward (no cache) and the dense engine for mixed batches, both mask kinds and
resumed rows; the pool is never exceeded and every block comes back."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import cpu_paged
from model.config import GMASK_ID, MASK_ID
from model.engine import Batch, Engine, RequestState
from model.generation import GenerationOptions, Generator
from model.paged_kv import BlockPool, PagedCache, PagedStep, PoolExhausted, blocks_for, prefill_mask
from model.prompt import Blank
from model.runner import load_model
from model.sampling import SamplingParams

SEEDED = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.1, seed=11)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("glm-tiny", tp=1, seed=5))


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Decode rows attend through the C kernel (kernels.cpu_paged) or the torch gather path."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_paged, "supports", lambda dtype: False)
    else:
        assert cpu_paged.kernel() is not None, "the paged decode kernel did not build on this machine"
    return request.param


def pool_of(model, blocks=64, block_size=4):
    c = model.config
    return BlockPool(c.num_layers, blocks, block_size, c.num_attention_heads, c.head_dim, dtype=model.dtype)


def prompt(n, mask=GMASK_ID, offset=0):
    return [20100 + (7 * i + offset) % 300 for i in range(n - 1)] + [mask]


def reference_logits(model, blank: Blank, generated: list[int]) -> torch.Tensor:
    """Logits of the last token of ``context + sop + generated``, one forward, no cache."""
    ids = blank.input_ids + generated
    pos = blank.context_positions() + [blank.position(k) for k in range(len(generated) + 1)]
    s, c = len(ids), blank.context_length
    mask = prefill_mask(s, c)
    out = model(torch.tensor([ids]), torch.tensor([pos]), mask)
    return out[0, -1]


def test_prefill_mask_is_glms_prefix_lm():
    m = ~prefill_mask(5, 3)[0, 0]
    assert m[0].tolist() == [True, True, True, False, False]       # context sees the context
    assert m[3].tolist() == [True, True, True, True, False]        # sop: context + itself
    assert m[4].tolist() == [True] * 5


def test_a_mixed_step_equals_the_reference_forward(model, path):
    """Rows decoding at different lengths and rows admitted in the same forward (a [MASK]
    row, a [gMASK] row, a resumed row with generated ids) get the reference logits."""
    pool = pool_of(model)
    engine = Engine(model, pool=pool)
    rows = [RequestState(1, Blank.first(prompt(9)), SamplingParams(greedy=True), allowed=20),
            RequestState(2, Blank.first(prompt(3, MASK_ID) + [20200] * 2), SamplingParams(greedy=True), allowed=20),
            RequestState(3, Blank.first(prompt(17, offset=3)), SamplingParams(greedy=True), allowed=20)]
    out = engine.mixed(None, Batch(1, rows[:2]))
    running = out.batch
    for _ in range(3):
        running = engine.mixed(running, None).batch
    seen = {}
    plain = engine.step

    def step(batch, logits):
        seen.update({r.id: logits[i].float().clone() for i, r in enumerate(batch.requests)})
        return plain(batch, logits)

    engine.step = step
    resumed = RequestState(4, Blank.first(prompt(6, MASK_ID, offset=5)), SamplingParams(greedy=True),
                           allowed=20, generated=[20300, 20301, 20302])
    out = engine.mixed(running, Batch(2, [rows[2], resumed]))
    assert out.batch.request_ids == [1, 2, 3, 4] and out.batch.id == 1
    for req in [*rows, resumed]:
        want = reference_logits(model, req.blank, req.generated[:-1])
        torch.testing.assert_close(seen[req.id], want, rtol=0, atol=1e-4)
    out.batch.release()
    assert pool.free_blocks == pool.num_blocks


@pytest.mark.parametrize("params", [dict(greedy=True), SEEDED])
def test_paged_engine_generates_what_glm_generate_does(model, params, path):
    """Rows admitted at different steps into the running batch generate exactly the tokens
    of ``glm generate`` (the dense engine) for the same blanks and seeds."""
    blanks = [Blank.first(prompt(n, mask, offset=n)) for n, mask in [(5, GMASK_ID), (14, MASK_ID), (9, GMASK_ID)]]
    sampling = [SamplingParams(**dict(params, **({"seed": 11 + i} if "seed" in params else {})))
                for i in range(3)]
    done = Generator(model).sample(blanks, sampling, GenerationOptions(max_new_tokens=9))
    pool = pool_of(model, blocks=40, block_size=4)
    engine = Engine(model, pool=pool)
    rows = [RequestState(i, b, p, allowed=9) for i, (b, p) in enumerate(zip(blanks, sampling))]
    running, waiting = None, list(rows)
    while running is not None or waiting:
        admit = Batch(10 + len(waiting), [waiting.pop(0)]) if waiting else None
        out = engine.mixed(running, admit)
        running = out.batch
    for row, completion in zip(rows, done):
        assert row.generated == completion.token_ids
    assert pool.free_blocks == pool.num_blocks


def test_the_pool_is_never_exceeded_and_every_block_comes_back(model):
    """Randomised: rows join, decode, leave and fork; a step that does not fit raises before
    anything changes; at every point the blocks in use are those the rows' tables hold."""
    rng = random.Random(3)
    pool = pool_of(model, blocks=24, block_size=4)
    engine = Engine(model, pool=pool)
    running, next_id, refused = None, 0, 0
    for _ in range(60):
        admit = None
        if rng.random() < 0.5:
            n = rng.randint(1, 3)
            admit = Batch(100 + next_id, [
                RequestState(next_id + k, Blank.first(prompt(rng.randint(2, 12), offset=k)),
                             SamplingParams(greedy=True), allowed=rng.randint(1, 12)) for k in range(n)])
            next_id += n
        if running is None and admit is None:
            continue
        before = (pool.free_blocks, list(running.cache.lengths) if running else [])
        try:
            out = engine.mixed(running, admit)
        except PoolExhausted:
            refused += 1
            assert (pool.free_blocks, list(running.cache.lengths) if running else []) == before
            if running is not None:                       # preempt the newest row
                running = running.rows(list(range(len(running.requests) - 1))) if len(running.requests) > 1 else None
                if running is None:
                    assert pool.free_blocks == pool.num_blocks
            continue
        running = out.batch
        if running is not None and rng.random() < 0.2:    # fork a row (beam-like): blocks shared
            rows = list(range(len(running.requests)))
            running = running.rows(rows + [rng.choice(rows)])
            running.requests = [r if i < len(rows) else RequestState(
                10_000 + next_id, r.blank, r.params, r.allowed, generated=list(r.generated))
                for i, r in enumerate(running.requests)]
            next_id += 1
        held = {}
        if running is not None:
            for table in running.cache.tables:
                for b in table:
                    held[b] = held.get(b, 0) + 1
            assert all(len(t) == blocks_for(n, 4) for t, n in zip(running.cache.tables, running.cache.lengths))
        assert pool.used_blocks == len(held) <= pool.num_blocks
        assert all(pool.refs[b] == n for b, n in held.items())
    assert refused > 0
    if running is not None:
        running.release()
    assert pool.free_blocks == pool.num_blocks and not any(pool.refs)


def test_a_forked_row_copies_a_shared_block_before_writing(model):
    pool = pool_of(model, blocks=8, block_size=4)
    cache = PagedCache(pool)
    cache.add_rows(1)
    cache.append([6])                                     # blocks 0 (full) and 1 (2 of 4)
    forked = cache.select([0, 0])
    assert forked.tables == [[0, 1], [0, 1]] and pool.refs[:2] == [2, 2]
    pool.keys[:, :, 4:6] = 1.0
    slots = forked.append([1, 1])
    assert forked.tables[0][0] == forked.tables[1][0] == 0
    assert forked.tables[0][1] != forked.tables[1][1]
    assert torch.equal(pool.keys[:, :, forked.tables[1][1] * 4:][:, :, :2],
                       pool.keys[:, :, 4:6]) or torch.equal(pool.keys[:, :, forked.tables[0][1] * 4:][:, :, :2],
                                                            pool.keys[:, :, 4:6])
    assert len(set(slots.tolist())) == 2
    forked.release()
    assert pool.free_blocks == 8
    with pytest.raises(PoolExhausted, match="9 blocks needed"):
        PagedCache(pool, [[]], [0]).append([36])
    assert pool.free_blocks == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_computes_what_the_torch_path_does(dtype):
    """Decode attention of rows of different lengths over scattered blocks: the C kernel
    against the torch gather path (masked fp32 batched matmuls), fp32 and bf16 pools."""
    torch.manual_seed(1)
    pool = BlockPool(2, 40, 4, 3, 16, dtype=dtype)
    cache = PagedCache(pool)
    cache.add_rows(5)
    cache.append([3, 9, 1, 14, 6])
    for _ in range(5):                                    # interleaved growth: scattered tables
        cache.append([1, 0, 2, 1, 3])
    pool.keys.normal_()
    pool.values.normal_()
    q = torch.randn(5, 3, 16).to(dtype)
    step = PagedStep.build(cache, 5, [])
    assert step.kernel                                    # the machine's build is in use
    outs = {}
    for kernel in (True, False):
        step.kernel = kernel
        out = torch.empty(5, 48, dtype=dtype)
        step._decode(1, q, 2.0, out)
        outs[kernel] = out.float().clone()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(outs[True], outs[False], rtol=tol, atol=tol)
    cache.release()


def test_the_pool_holds_what_glm_plan_counts_per_token(model):
    """A pool of ``n`` blocks is exactly ``glm plan``'s KV bytes per token x its tokens (both
    count keys and values of every layer for the rank's heads), so the capacity Warmup sizes
    from the memory left is the plan's "kv tokens that fit" for that memory, in whole blocks."""
    from model.plan import plan_memory

    pool = pool_of(model, blocks=37, block_size=16)
    plan = plan_memory(model.config, quant="none", tp=1, gpu_memory_gib=1.0, max_tokens=64, dtype_bytes=4)
    assert pool.nbytes() == plan.kv_bytes_per_token * 37 * 16


def test_the_kernel_takes_threads_by_the_keys_it_reads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = cpu_paged.threads_for(torch.tensor([100]), 8, 32)            # 25 600 keys: one thread
        large = cpu_paged.threads_for(torch.tensor([1024] * 16), 8, 32)      # 4.2 M keys: both
        assert (small, large) == (1, 2)
    finally:
        torch.set_num_threads(before)
