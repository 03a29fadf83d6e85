"""Memory per GPU for a model × quantization × tensor-parallel size × context.

Pure arithmetic over ``GLMConfig``: no torch, no devices. Each rank holds

* **weights**: its shard of the four linears of every layer (fp16, or int8 at
  1 byte/param, or packed int4 at 0.5 byte/param, plus fp16 scales, one per local
  output row or per ``group_size`` input columns), its sharded biases (qkv, h_to_4h),
  the replicated LayerNorms and row-parallel biases, and its vocab slice of the word
  embedding (the tied LM head), twice with ``head_copy`` (a CPU serving bf16 with native bf16
  keeps a packed copy of that slice for the head, ``model/parallel.py``);
* **kv_cache**: keys and values of every layer for its heads, preallocated to
  ``max_tokens × batch`` slots;
* **activations**: the largest transient of a ``max_tokens`` prefill at ``batch``
  (see ``_activation_bytes``);
* **reserve**: a fixed allowance for what torch does not show as tensors
  (``RESERVE_BYTES``).

The model follows our dequantize + GEMM prefill path and the official SAT code
(``docs/model.md`` "Quantization"), not FasterTransformer, whose larger preallocated
buffers run out of memory where this path fits (the official FasterTransformer INT4 table in
``G130: docs/quantization.md`` reports OOM at 1024+ tokens on 4×RTX 3090).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import GLMConfig

GIB = 1 << 30
MIB = 1 << 20
QUANT_BITS = {"none": None, "int8": 8, "int4": 4}
SCALE_BYTES = 2  # fp16 scales, the official format (docs/model.md "Quantization")
SCORE_BYTES = 4  # the fp32 softmax's copy of the attention scores (docs/model.md "Attention and QKV layout")

# What the CUDA driver and libraries hold outside torch tensors, and what the caching
# allocator cannot hand back, per GPU: the CUDA context with torch's kernels loaded
# lazily (~300-500 MiB on Ampere/Turing), cuBLAS workspaces (tens of MiB), NCCL's
# per-peer channel buffers for the all-reduces (~100-200 MiB at TP 8) and allocator
# fragmentation from blocks of mixed sizes. One GiB covers these with some slack;
# it does not scale with the model, so it is a constant.
RESERVE_BYTES = 1 * GIB


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on each GPU; ``fits`` when ``total`` is at most the GPU's memory."""

    quant: str
    tp: int
    max_tokens: int
    batch: int
    gpu_memory: int  # bytes
    weights: int
    kv_cache: int
    activations: int
    reserve: int
    kv_bytes_per_token: int  # per GPU, for one token of one sequence

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def headroom(self) -> int:
        """Bytes left over (negative when it does not fit)."""
        return self.gpu_memory - self.total

    def to_dict(self) -> dict:
        gib = lambda n: round(n / GIB, 3)  # noqa: E731
        return {
            "quant": self.quant,
            "tp": self.tp,
            "max_tokens": self.max_tokens,
            "batch": self.batch,
            "gpu_memory_gib": gib(self.gpu_memory),
            "weights_gib": gib(self.weights),
            "kv_cache_gib": gib(self.kv_cache),
            "activations_gib": gib(self.activations),
            "reserve_gib": gib(self.reserve),
            "per_gpu_gib": gib(self.total),
            "all_gpus_gib": gib(self.total * self.tp),
            "headroom_gib": gib(self.headroom),
            "fits": self.fits,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_batch_tokens": max_batch_tokens(self),
        }


def max_batch_tokens(plan: MemoryPlan) -> int:
    """KV-cache slots (tokens summed over a batch) that fit beside the weights, the
    prefill transient and the reserve; 0 when not even those fit."""
    free = plan.gpu_memory - plan.weights - plan.activations - plan.reserve
    return max(free, 0) // plan.kv_bytes_per_token


def _linears(config: GLMConfig, tp: int) -> list[tuple[int, int]]:
    """Local ``(out, in)`` of one layer's four linears on one rank."""
    h, inner = config.hidden_size, config.inner_hidden_size
    return [
        (3 * h // tp, h),  # query_key_value, column parallel
        (h, h // tp),  # attention.dense, row parallel: every rank keeps all h output rows
        (2 * inner // tp, h),  # dense_h_to_4h, column parallel, both GLU halves
        (h, inner // tp),  # dense_4h_to_h, row parallel
    ]


CPU_INT4_GROUPS = (256, 128, 64, 32)   # the group sizes of torch's CPU int4 kernel, largest first


def cpu_repack_bytes(out_rows: int, in_cols: int, bits: int, group_size: int | None) -> int:
    """What the CPU weight-only kernels hold beside the canonical weight (``kernels/cpu.py``,
    bf16 activations): INT8 per row keeps bf16 scales ``[N]``; INT4 a repacked copy of the
    values ``[N, K/2]`` plus bf16 scales and zeros ``[K/g, N, 2]``; group-wise INT8 nothing."""
    if bits == 8:
        return 0 if group_size else out_rows * 2
    span = in_cols if group_size is None else group_size
    group = next((g for g in CPU_INT4_GROUPS if span % g == 0), None)
    if group is None:
        return 0
    return out_rows * in_cols // 2 + in_cols // group * out_rows * 2 * 2


def weight_bytes(config: GLMConfig, *, quant: str, tp: int, dtype_bytes: int = 2,
                 group_size: int | None = None, head_copy: bool = False, cpu_kernels: bool = False) -> int:
    """Bytes of one rank's parameters (inputs already validated); ``head_copy`` adds the LM
    head's packed copy, ``cpu_kernels`` the copies the CPU kernels repack for bf16
    activations (``cpu_repack_bytes``)."""
    h, inner, layers = config.hidden_size, config.inner_hidden_size, config.num_layers
    bits = QUANT_BITS[quant]
    linear = 0
    for out_rows, in_cols in _linears(config, tp):
        if bits is None:
            linear += out_rows * in_cols * dtype_bytes
            continue
        linear += out_rows * in_cols * bits // 8
        groups = 1 if group_size is None else in_cols // group_size
        linear += out_rows * groups * SCALE_BYTES
        if cpu_kernels:
            linear += cpu_repack_bytes(out_rows, in_cols, bits, group_size)
    sharded_bias = (3 * h + 2 * inner) // tp  # qkv, h_to_4h
    replicated = 4 * h + 2 * h  # two LayerNorms (w, b); dense and 4h_to_h biases
    per_layer = linear + (sharded_bias + replicated) * dtype_bytes
    embedding = config.vocab_size // tp * h * dtype_bytes  # = tied LM head
    if head_copy:
        embedding *= 2  # the head's packed copy beside the lookup table
    final_layernorm = 2 * h * dtype_bytes
    return layers * per_layer + embedding + final_layernorm


def _activation_bytes(config: GLMConfig, *, quant: str, tp: int, tokens: int, batch: int,
                      dtype_bytes: int) -> int:
    """Peak transient of one prefill of ``tokens`` at ``batch`` on one rank.

    Phases run one after another, so the peak is the largest phase, plus the fp16
    weight dequantized for the GEMM: the caching allocator keeps the block of the
    largest shard once it has been used, so it counts in every phase.
    """
    h, inner, heads = config.hidden_size, config.inner_hidden_size, config.num_attention_heads
    rows = batch * tokens
    hidden = 2 * rows * h * dtype_bytes  # residual input and its LayerNorm output [b, s, h]
    attention = (
        hidden
        + rows * 3 * h // tp * dtype_bytes  # qkv output [b, s, 3h/tp]
        + batch * heads // tp * tokens * tokens * (dtype_bytes + SCORE_BYTES)  # scores
        # [b, np/tp, s, s]: the matmul's 16-bit output and the fp32 softmax copy
    )
    mlp = (
        hidden
        + rows * 2 * inner // tp * dtype_bytes  # h_to_4h output [b, s, 2I/tp]
        + rows * inner // tp * dtype_bytes  # GeGLU output [b, s, I/tp]
    )
    # Last position only: local logits [b, V/tp], gathered to [b, V] in fp32 for sampling.
    head = batch * h * dtype_bytes + batch * config.vocab_size // tp * dtype_bytes
    head += batch * config.vocab_size * 4
    workspace = 0
    if QUANT_BITS[quant] is not None:
        workspace = max(o * i for o, i in _linears(config, tp)) * dtype_bytes
    return workspace + max(attention, mlp, head)


def _check_int(name: str, value, lowest: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")


def _validate(config, quant, tp, gpu_memory_gib, max_tokens, batch, dtype_bytes,
              group_size) -> None:
    if not isinstance(config, GLMConfig):
        raise ValueError(f"config must be a GLMConfig, got {type(config).__name__}")
    if quant not in QUANT_BITS:
        raise ValueError(f"quant must be one of {', '.join(QUANT_BITS)}, got {quant!r}")
    try:
        config.check_tp(tp)
    except ValueError as exc:
        raise ValueError(f"tp: {exc}") from None
    if (not isinstance(gpu_memory_gib, (int, float)) or isinstance(gpu_memory_gib, bool)
            or not math.isfinite(gpu_memory_gib) or gpu_memory_gib <= 0):
        raise ValueError(f"gpu_memory_gib must be a positive number, got {gpu_memory_gib!r}")
    _check_int("max_tokens", max_tokens)
    if max_tokens > config.max_sequence_length:
        raise ValueError(f"max_tokens {max_tokens} exceeds the model's max_sequence_length "
                         f"{config.max_sequence_length}")
    _check_int("batch", batch)
    if dtype_bytes not in (1, 2, 4) or isinstance(dtype_bytes, bool):
        raise ValueError(f"dtype_bytes must be 1, 2 or 4, got {dtype_bytes!r}")
    if group_size is None:
        return
    _check_int("group_size", group_size)
    if quant == "none":
        raise ValueError("group_size needs quant int8 or int4")
    for _, in_cols in _linears(config, tp):
        if in_cols % group_size or (QUANT_BITS[quant] == 4 and group_size % 2):
            raise ValueError(f"group_size {group_size} does not divide the local input "
                             f"size {in_cols} into whole (even for int4) groups")


def plan_memory(config: GLMConfig, *, quant: str, tp: int, gpu_memory_gib: float,
                max_tokens: int = 2048, batch: int = 1, dtype_bytes: int = 2,
                group_size: int | None = None, head_copy: bool = False, cpu_kernels: bool = False) -> MemoryPlan:
    """Per-GPU memory to serve ``batch`` sequences of ``max_tokens`` (prompt + output)
    with ``tp`` ranks; raises ValueError naming the bad input. ``cpu_kernels``: the ranks
    run on CPU with bf16 activations, so the weights include the kernels' repacked copies."""
    _validate(config, quant, tp, gpu_memory_gib, max_tokens, batch, dtype_bytes, group_size)
    kv_per_token = 2 * config.num_layers * config.hidden_size // tp * dtype_bytes  # k and v
    return MemoryPlan(
        quant=quant,
        tp=tp,
        max_tokens=max_tokens,
        batch=batch,
        gpu_memory=int(gpu_memory_gib * GIB),
        weights=weight_bytes(config, quant=quant, tp=tp, dtype_bytes=dtype_bytes,
                             group_size=group_size, head_copy=head_copy, cpu_kernels=cpu_kernels),
        kv_cache=kv_per_token * max_tokens * batch,
        activations=_activation_bytes(config, quant=quant, tp=tp, tokens=max_tokens,
                                      batch=batch, dtype_bytes=dtype_bytes),
        reserve=RESERVE_BYTES,
        kv_bytes_per_token=kv_per_token,
    )
