"""``glm bench step``: the model-level rungs of the benchmark ladder, below the services.

For one model shard (a checkpoint, or ``--load-format dummy`` weights for a preset), on every
rank of ``tp`` (real processes over gloo, ``model.distributed.run_local_ranks``):

* **decode**, per batch size: the bare forward (``Engine.decode_logits``: embedding, layers,
  final LayerNorm, tied LM head), the LM head and the embedding alone (to split the forward into
  ms per layer), and the whole worker step (``Engine.decode``: forward + sampling + bookkeeping);
  median and p90 over ``steps`` timed calls after ``warmup`` untimed ones. Every figure carries
  the bytes the forward must read (every stored weight byte, quantization scales included, the
  embedding read whole by the LM head, the KV cache read by attention) and the fraction of the
  machine's read bandwidth measured in the same run, and its FLOP rate;
* **prefill** of ``prompt_tokens`` tokens at batch 1: ms, tokens/s, FLOP/s;
* **memory**: the resident set (``VmRSS``) before and after building the shard, against
  ``glm plan``'s weight bytes for the same shape (``model.plan``, with the CPU kernels' repacked
  copies counted on CPU).

Rows decode greedily with ``min_new_tokens`` banning the end tokens, as ``glm bench serve``'s
load does, so no row leaves the batch. ``kv_cache`` chooses the cache: ``paged`` (the workers'
block pool, ``model.paged_kv``: the forward is one packed ``GLMModel.step_logits``) or ``dense``
(the left-padded ``model.kv_cache.KVCache`` of ``glm generate`` and beam search). On TP > 1 the ranks build their shards one after the
other (only one build's transient at a time) and run the same calls in lockstep; rank 0's
timings are reported, with every rank's memory. Importing this module loads no torch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from model.config import GMASK_ID, check_model_source, dummy_config

TEXT_ID = 20100               # any text id: prompts are ``TEXT_ID + i % 1000`` then [gMASK]
KV_CACHES = ("paged", "dense")


@dataclass(frozen=True)
class StepBench:
    """What ``glm bench step`` measures (picklable: every rank gets it)."""

    checkpoint: str | None = None
    load_format: str = "auto"
    preset: str | None = None
    num_layers: int | None = None
    dtype: str = "float32"
    quant: str | None = None
    tp: int = 1
    batches: tuple[int, ...] = (1, 8, 32, 64)
    prompt_tokens: int = 512
    context_tokens: int = 32
    steps: int = 10
    warmup: int = 2
    bandwidth_gib: float = 1.0
    threads: int | None = None        # torch threads per rank (default: CPUs / tp)
    kv_cache: str = "paged"           # paged (the workers' block pool) | dense
    kv_block_size: int = 16           # tokens per block of the paged pool

    def __post_init__(self) -> None:
        check_model_source(self.load_format, self.checkpoint, self.preset, self.num_layers)
        if self.load_format == "auto" and not self.checkpoint:
            raise ValueError("glm bench step needs a model: --checkpoint DIR, or --load-format dummy --preset NAME")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        for name in ("tp", "prompt_tokens", "context_tokens", "steps", "kv_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.bandwidth_gib <= 0:
            raise ValueError("--warmup must be >= 0 and --bandwidth-gib > 0")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"--batch: a comma-separated list of batch sizes >= 1, got {self.batches}")


def rss_bytes() -> int:
    """This process's resident set (``VmRSS`` of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def read_bandwidth(gib: float, runs: int = 5) -> float:
    """Bytes/s read: the probe of ``glm bench gemv`` (``services/bench/bandwidth.py``)."""
    from services.bench.bandwidth import measure_bandwidth

    return measure_bandwidth(gib, runs)["read_gb_s"] * 1e9


def _timed(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _build(ctx, bench: StepBench):
    """This rank's shard, the ranks building one after the other."""
    import torch.distributed as dist

    from model.runner import open_model, parse_dtype

    model = None
    for rank in range(ctx.world_size):
        if rank == ctx.rank:
            model = open_model(bench.checkpoint, ctx, load_format=bench.load_format, preset=bench.preset,
                               num_layers=bench.num_layers, dtype=parse_dtype(bench.dtype), quant=bench.quant)
        if ctx.distributed:
            dist.barrier()
    return model


def shard_bytes(model) -> dict:
    """Bytes of this rank's stored weights: the layers' tensors (quantized values and scales
    included) and the embedding (read whole by the tied LM head)."""
    state = model.state_dict()
    embedding = state["transformer.word_embeddings.weight"].nbytes
    return {"layers": sum(t.nbytes for k, t in state.items() if k.startswith("transformer.layers.")),
            "embedding": embedding,
            "other": sum(t.nbytes for k, t in state.items() if not k.startswith("transformer.layers.")) - embedding}


def _linear_params(model) -> int:
    """Multiply-adds per token of the layers' four linears on this rank."""
    from model.parallel import ColumnParallelLinear, RowParallelLinear

    total = 0
    for module in model.transformer.layers.modules():
        if isinstance(module, ColumnParallelLinear):
            total += module.out_features_local * module.in_features
        elif isinstance(module, RowParallelLinear):
            total += module.out_features * module.in_features_local
    return total


def _decode_rows(batch_size: int, context_tokens: int, budget: int):
    from model.engine import RequestState
    from model.prompt import Blank
    from model.sampling import SamplingParams

    context = [TEXT_ID + i % 1000 for i in range(context_tokens - 1)] + [GMASK_ID]
    blank = Blank.first(context)
    # Greedy without logprobs, as a served request that asks for neither (the worker's step then
    # costs an argmax per row, no log-softmax).
    return [RequestState(i, blank, SamplingParams(greedy=True), allowed=budget, min_new=budget, logprobs=False)
            for i in range(batch_size)]


def bench_decode(engine, bench: StepBench, batch_size: int) -> dict:
    """One batch size: forward, head, embedding and worker-step timings, taken in rounds (one
    call of each per round) so that a burst of load on the machine hits them all alike."""
    import torch

    from model.engine import Batch

    model, t = engine.model, engine.model.transformer
    calls = 2 * (bench.steps + bench.warmup) + 2
    batch = Batch(0, _decode_rows(batch_size, bench.context_tokens, calls))
    if bench.kv_cache == "paged":                           # a pool for this batch size only
        engine.pool = _pool(model, batch_size, bench.context_tokens + calls + 1, bench.kv_block_size)
    state = {"batch": engine.prefill(batch).batch}              # fills the cache, picks the first token
    batch = state["batch"]
    length_before = batch.cache.length
    positions = batch.decode_positions(engine.device)
    hidden = torch.randn((batch_size, 1, model.config.hidden_size), dtype=model.dtype)
    ids = batch.pending.view(batch_size, 1)

    def embed() -> None:                                        # what the forward does before layer 0
        model.rotary(positions, model.dtype)
        t.word_embeddings(ids)

    def paged_forward():                                        # the packed forward of a decode step
        from model.paged_kv import PagedStep

        now = state["batch"]
        return model.step_logits(now.pending, positions.view(-1), PagedStep.build(now.cache, batch_size, []))

    def step() -> None:                                         # a paged step moves the rows to a new batch
        state["batch"] = engine.decode(state["batch"]).batch

    parts = {
        "forward": (paged_forward if engine.pool is not None
                    else lambda: engine.decode_logits(batch.cache, batch.pending, positions)),
        "head": lambda: t.word_embeddings.logits(t.final_layernorm(hidden)),   # as the forward: compute dtype
        "embed": embed,
        "step": step,
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.inference_mode():
        for round_ in range(bench.warmup + bench.steps):
            for name, fn in parts.items():
                start = time.perf_counter()
                fn()
                if round_ >= bench.warmup:
                    times[name].append(time.perf_counter() - start)
    batch = state["batch"]
    kv_length = (length_before + batch.cache.length) / 2        # mean slots read over the calls
    if engine.pool is not None:
        batch.release()
    return {"batch": batch_size, "kv_length": kv_length, **times}


def _pool(model, rows: int, tokens: int, block_size: int):
    """A block pool holding ``rows`` rows of ``tokens`` tokens each."""
    from model.kv_footprint import blocks_for
    from model.paged_kv import BlockPool

    c = model.config
    return BlockPool(c.num_layers, rows * blocks_for(tokens, block_size), block_size,
                     c.num_attention_heads // model.ctx.world_size, c.head_dim, dtype=model.dtype,
                     device=model.device)


def paged_decode(engine, rows: int, context_tokens: int, calls: int, block_size: int = 16):
    """``rows`` greedy rows of ``context_tokens`` prefilled into a pool of their own (room for
    ``calls`` more tokens each), given to ``engine``; the batch (release it after) and the packed
    forward of its decode step alone (each call claims the rows' next slots, as a step does)."""
    from model.engine import Batch
    from model.paged_kv import PagedStep

    model = engine.model
    engine.pool = _pool(model, rows, context_tokens + calls + 1, block_size)
    batch = engine.prefill(Batch(0, _decode_rows(rows, context_tokens, calls))).batch
    positions = batch.decode_positions(engine.device).view(-1)
    return batch, lambda: model.step_logits(batch.pending, positions, PagedStep.build(batch.cache, rows, []))


def _prefill_forward(engine, rows):
    """The prefill forward alone (no sampling) of a new batch of ``rows``."""
    from model.engine import Batch

    if engine.pool is None:
        return engine.prefill_logits(Batch(0, rows))
    from model.paged_kv import PagedCache, PagedStep

    cache = PagedCache(engine.pool)
    cache.add_rows(len(rows))
    step = PagedStep.build(cache, 0, [(len(r.prefill_ids), r.blank.context_length) for r in rows])
    ids = torch_tensor([t for r in rows for t in r.prefill_ids])
    pos = torch_tensor([p for r in rows for p in r.prefill_positions])
    try:
        return engine.model.step_logits(ids, pos, step)
    finally:
        cache.release()


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.long)


def bench_prefill(engine, bench: StepBench) -> dict:
    """Prefills of ``prompt_tokens`` at batch 1, after (with ``warmup``) one short prefill that
    pays the first-call costs without the long call's minutes at full width."""
    if bench.kv_cache == "paged":
        engine.pool = _pool(engine.model, 1, bench.prompt_tokens, bench.kv_block_size)
    if bench.warmup:
        _prefill_forward(engine, _decode_rows(1, min(16, bench.prompt_tokens - 1), 1))
    rows = _decode_rows(1, bench.prompt_tokens - 1, 1)          # context + sop = prompt_tokens
    times = _timed(lambda: _prefill_forward(engine, rows), max(1, bench.steps // 3), 0)
    return {"tokens": bench.prompt_tokens, "times": times}


def bench_rank(ctx, bench: StepBench) -> dict:
    """Everything one rank measures (every rank runs the same calls, in the same order)."""
    import torch

    from model.engine import Engine

    from services.common.malloc import tune_malloc

    tune_malloc()                      # as the worker does (its per-step temporaries reuse heap pages)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    before = rss_bytes()
    model = _build(ctx, bench)
    after = rss_bytes()
    engine = Engine(model)                                   # each measurement gives it its pool (paged)
    decode = [bench_decode(engine, bench, b) for b in bench.batches]
    prefill = bench_prefill(engine, bench)
    c = model.config
    return {"rank": ctx.rank, "rss_before_build": before, "rss_after_build": after, "rss_end": rss_bytes(),
            "threads": torch.get_num_threads(), "bytes": shard_bytes(model), "linear_params": _linear_params(model),
            "vocab_local": c.vocab_size // ctx.world_size, "hidden_local": c.hidden_size // ctx.world_size,
            "dtype_bytes": torch.empty((), dtype=model.dtype).element_size(), "config": c.to_json_dict(),
            "quant": model.quant.name if model.quant else "none", "decode": decode, "prefill": prefill,
            "head_copy": model.transformer.word_embeddings.head_nbytes > 0}


def run(bench: StepBench) -> dict:
    """Every rank's measurements, between two probes of the read bandwidth (the best of both
    counts: on a shared machine one probe alone may fall in a burst of other load)."""
    from model.distributed import run_local_ranks
    from model.parallel import ParallelContext

    first = read_bandwidth(bench.bandwidth_gib)
    if bench.tp == 1:
        ranks = [bench_rank(ParallelContext(), bench)]
    else:
        ranks = run_local_ranks(bench_rank, bench.tp, bench, timeout_s=3600.0)
    last = read_bandwidth(bench.bandwidth_gib)
    report = summarise(bench, ranks, max(first, last))
    report["read_bandwidth_probes_gb_s"] = [first / 1e9, last / 1e9]
    return report


def summarise(bench: StepBench, ranks: list[dict], bandwidth: float) -> dict:
    """Rank 0's timings with bytes, bandwidth fractions and FLOP rates; every rank's memory."""
    from services.bench.step_report import decode_row, memory_rows, prefill_row

    zero = ranks[0]
    return {"settings": asdict(bench), "config": zero["config"], "quant": zero["quant"],
            "threads_per_rank": zero["threads"], "read_bandwidth_gb_s": bandwidth / 1e9,
            "shard_bytes": zero["bytes"],
            "decode": [decode_row(zero, row, bench.tp, bandwidth) for row in zero["decode"]],
            "prefill": prefill_row(zero, zero["prefill"], bench.tp),
            "memory": memory_rows(bench, ranks)}


def config_of(bench: StepBench):
    """The model shape (for ``glm plan``'s prediction) without building anything."""
    if bench.load_format == "dummy":
        return dummy_config(bench.preset, bench.num_layers)
    from model.config import GLMConfig

    return GLMConfig.for_checkpoint(bench.checkpoint)
