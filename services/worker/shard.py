"""The state of one rank: its model shard, the cached batches, the KV capacity.

Prefill and Decode run the decoding engine (``model.engine.Engine``, the one
``glm generate`` uses); this module adds what only a serving rank needs: the
capacity, refusals, the token digest, tracing and out-of-memory handling.
Every method is synchronous and runs on the server's single model thread, in
the order the calls arrive; the scheduler sends the same calls in the same
order to every rank, so every rank runs the same collectives. Anything that can
be refused is checked *before* the first collective (the same check on every
rank gives the same answer), so a refusal never leaves ranks out of step. A row
that fails on its own inside a step (``model.engine``: rank 0 broadcasts which)
leaves the batch on every rank and is reported in the response's ``failed``; the
rank stays healthy and the other rows go on.
"""

from __future__ import annotations

import hashlib
import logging
import time

import torch
import torch.distributed as dist
from opentelemetry import trace
from opentelemetry.context import Context

from model.config import GMASK_ID
from model.cuda_graphs import PagedDecodeGraphs
from model.engine import Engine, StepOutput
from model.glm import GLMModel
from model.kv_footprint import padded_kv_slots
from model.paged_kv import DEFAULT_BLOCK_SIZE, BlockPool, decode_kernel
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.tracing import LayerSampler
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.batch import ShardBatch, failures_pb, generations_pb
from services.worker.kv_budget import kv_bytes_per_token, kv_memory_bytes

log = logging.getLogger("glm.worker")


def ahead_problem(req: pb.DecodeRequest) -> str:
    """What makes ``req``, a Decode sent ahead, malformed ("" if nothing)."""
    if req.step < 1:
        return "decode: a step sent ahead needs its step number (step >= 1)"
    if req.HasField("admit") or not req.batches or any(b.request_ids for b in req.batches):
        return "decode: a step sent ahead lists batches by id only and admits nothing"
    return ""

WARMUP_TOKEN = 20100  # any text id


class OutOfMemory(ResourceExhausted):
    """The device ran out of memory mid-forward; the batches involved are dropped."""


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Shard:
    """One rank's serving state: the model shard and its engine, the cached batches by
    id, the KV capacity (set by Warmup) and the digest of every token applied."""

    def __init__(self, model: GLMModel, *, model_name: str, quantization: str = "none",
                 kv_memory_gib: float | None = None, tracer: trace.Tracer | None = None,
                 layer_trace_ratio: float = 0.0, decode_graphs: bool = False,
                 kv_block_size: int = DEFAULT_BLOCK_SIZE, prompt_cache: bool = True) -> None:
        self.model, self.ctx, self.config = model, model.ctx, model.config
        self.decode_graphs = decode_graphs  # Warmup builds model.cuda_graphs.PagedDecodeGraphs (captured on CUDA)
        self.engine = Engine(model, prompt_cache=prompt_cache)
        self.device = model.device
        self.model_name, self.quantization = model_name, quantization
        self.kv_memory_gib = kv_memory_gib
        self.kv_bytes_per_token = kv_bytes_per_token(self.config, self.ctx.world_size, model.dtype)
        self.capacity: int | None = None     # KV token slots, set by Warmup
        self.kv_block_size = kv_block_size
        self.pool: BlockPool | None = None   # the paged KV pool, sized by Warmup (None with decode graphs)
        self.batches: dict[int, ShardBatch] = {}
        self.tracer = tracer or trace.NoOpTracer()
        self.layer_sampler = LayerSampler(layer_trace_ratio)
        self.digest = hashlib.sha256()
        self.steps = 0

    # -- info and health -------------------------------------------------------------------
    def info(self) -> pb.InfoResponse:
        c = self.config
        return pb.InfoResponse(
            model_name=self.model_name, dtype=str(self.model.dtype).removeprefix("torch."),
            config=pb.ModelConfig(num_layers=c.num_layers, hidden_size=c.hidden_size,
                                  num_attention_heads=c.num_attention_heads,
                                  inner_hidden_size=c.inner_hidden_size, vocab_size=c.vocab_size,
                                  max_sequence_length=c.max_sequence_length),
            quantization=self.quantization, tp_size=self.ctx.world_size, rank=self.ctx.rank,
            device=str(self.device), kv_bytes_per_token=self.kv_bytes_per_token,
            max_batch_total_tokens=self.capacity or 0)

    def health(self) -> pb.HealthResponse:
        if self.device.type == "cuda":
            torch.zeros((2, 2), device=self.device).sum().item()
        return pb.HealthResponse(
            rank=self.ctx.rank, steps=self.steps, token_digest=self.digest.copy().hexdigest(),
            cached_batches=len(self.batches),
            cached_tokens=sum(b.max_tokens for b in self.batches.values()))

    # -- forwards --------------------------------------------------------------------------
    def _forward(self, span: trace.Span, run):
        """``run()`` with per-layer spans when this forward is sampled."""
        self.steps += 1
        if not self.layer_sampler.next():
            return run()
        parent = trace.set_span_in_context(span)
        rank = self.ctx.rank

        def observe(layer_id: int, seconds: float) -> None:
            end = time.time_ns()
            child = self.tracer.start_span("worker.layer", context=parent, start_time=end - int(seconds * 1e9),
                                           attributes={"glm.layer": layer_id, "glm.rank": rank})
            child.end(end_time=end)

        self.model.layer_observer = observe
        try:
            return run()
        finally:
            self.model.layer_observer = None

    def _prefill(self, batch: ShardBatch, span: trace.Span, record: bool = True) -> StepOutput:
        return self._record(self._forward(span, lambda: self.engine.prefill(batch)), record)

    def _decode(self, batch: ShardBatch, span: trace.Span, record: bool = True) -> StepOutput:
        return self._record(self._forward(span, lambda: self.engine.decode(batch)), record)

    def _step(self, running: ShardBatch | None, admit: ShardBatch | None, span: trace.Span) -> StepOutput:
        return self._record(self._forward(span, lambda: self.engine.mixed(running, admit)), True)

    def _record(self, step: StepOutput, record: bool) -> StepOutput:
        """Fold the step's applied ``(request id, token)`` pairs into the digest."""
        if record:
            for t in step.tokens:
                self.digest.update(f"{t.request.id}:{t.token_id};".encode())
        return step

    def _guarded(self, run, dropped: str):
        try:
            return run()
        except Exception as exc:
            if not is_oom(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"out of memory on rank {self.ctx.rank}; dropped {dropped}: {exc}") from None

    # -- calls -----------------------------------------------------------------------------
    def warmup(self, req: pb.WarmupRequest, parent: Context | None = None) -> pb.WarmupResponse:
        n, inp, total = req.max_batch_size, req.max_input_tokens, req.max_total_tokens
        limit = self.config.max_sequence_length
        if n < 1:
            raise InvalidArgument(f"warmup: max_batch_size must be >= 1, got {n}")
        if not 2 <= inp < total <= limit:
            raise InvalidArgument(
                f"warmup: need 2 <= max_input_tokens ({inp}) < max_total_tokens ({total}) "
                f"<= max_sequence_length ({limit})")
        context = [WARMUP_TOKEN] * (inp - 2) + [GMASK_ID]                 # + sop = inp tokens
        msg = pb.Batch(id=2**64 - 1, requests=[
            pb.Request(id=i, input_ids=context, sampling=pb.SamplingParameters(greedy=True),
                       stopping=pb.StoppingCriteria(max_new_tokens=total - inp)) for i in range(n)])
        with self.tracer.start_as_current_span("worker.warmup", context=parent) as span:
            self._drop_pool()                     # the warm-up batch runs dense, before the pool is sized
            batch = ShardBatch.from_pb(msg, self.config)
            result = self._guarded(lambda: self._prefill(batch, span, record=False), "the warm-up batch")
            if result.batch is not None:
                self._guarded(lambda: self._decode(result.batch, span, record=False), "the warm-up batch")
            del batch, result
            memory = kv_memory_bytes(self.device, kv_memory_gib=self.kv_memory_gib,
                                     local_ranks=self.ctx.world_size)
            blocks = memory // (self.kv_bytes_per_token * self.kv_block_size) - int(self.decode_graphs)
            capacity = torch.tensor([blocks], dtype=torch.long, device=self.device)   # - the graphs' scratch
            if self.ctx.distributed:                                      # every rank: the smallest
                dist.all_reduce(capacity, op=dist.ReduceOp.MIN, group=self.ctx.group)
            self._build_pool(int(capacity))
            if self.decode_graphs and self.pool is not None:
                self._build_graphs(n, span)
            span.set_attribute("glm.kv_capacity_tokens", self.capacity)
        if self.capacity < total:
            raise ResourceExhausted(
                f"warmup: KV memory holds {self.capacity} tokens, fewer than max_total_tokens {total}")
        pool = self.pool
        return pb.WarmupResponse(max_batch_total_tokens=self.capacity,
                                 kv_bytes_per_token=self.kv_bytes_per_token, kv_memory_bytes=memory,
                                 kv_block_size=pool.block_size if pool else 0, kv_blocks=pool.num_blocks if pool else 0)

    def _drop_pool(self) -> None:
        """A second Warmup replaces the pool (and the decode graphs over it): the cached
        batches are dropped with it."""
        for batch in self.batches.values():
            batch.release()
        self.batches.clear()
        self.engine.pool = self.pool = self.engine.graphs = None

    def _build_pool(self, blocks: int) -> None:
        """The paged KV pool of ``blocks`` blocks (every rank the same count), plus the
        scratch block of the decode graphs when they are on."""
        if blocks < 1:
            self.capacity = 0
            return
        c = self.config
        self.pool = BlockPool(c.num_layers, blocks, self.kv_block_size, c.num_attention_heads // self.ctx.world_size,
                              c.head_dim, dtype=self.model.dtype, device=self.device, scratch=self.decode_graphs)
        self.engine.pool = self.pool
        self.capacity = blocks * self.kv_block_size

    def _build_graphs(self, max_batch: int, span: trace.Span) -> None:
        """The decode graphs over the pool for batches up to ``max_batch`` (captured on CUDA;
        a CPU runs the same static forward uncaptured). On CUDA they need the paged kernel: the
        static torch path reads every row's whole table width, slower than the eager step."""
        if self.device.type == "cuda" and not decode_kernel(self.pool):
            log.warning("CUDA graphs off: kernels.cuda_paged is not available (cupy + NVRTC); decoding eagerly")
            span.set_attribute("glm.decode_graphs_captured", 0)
            return
        graphs = PagedDecodeGraphs(self.model, self.pool, max_batch=max_batch)
        span.set_attribute("glm.decode_graphs_captured", len(graphs.capture()))
        self.engine.graphs = graphs

    def _check_room(self, batch: ShardBatch) -> None:
        """Refuse a batch whose merge with every cached batch could exceed the capacity (dense);
        the paged pool checks each step instead (``_check_blocks``)."""
        if self.pool is not None:
            return
        batches = [*self.batches.values(), batch]
        rows = sum(len(b.requests) for b in batches)
        width = max(b.width for b in batches)
        need = padded_kv_slots(rows, width, max(b.max_remaining for b in batches))
        if need > self.capacity:
            raise ResourceExhausted(
                f"batch {batch.id}: needs {need} KV token slots ({rows} rows x ({width} + {need // rows - width}) "
                f"with the cached batches), capacity is {self.capacity}")

    def _check_blocks(self, running: list[ShardBatch], admit: ShardBatch | None) -> None:
        """Refuse a paged step the pool's free blocks cannot hold (before any collective)."""
        if self.pool is None:
            return
        plan = self.engine.plan_admission(admit)
        need = sum(self.engine.blocks_needed(b, None) for b in running)
        need += self.engine.blocks_needed(None, admit, plan) if admit is not None else 0
        free = self.engine.free_for(need, plan)                  # the prompt cache gives way first
        if need > free:
            raise ResourceExhausted(
                f"KV pool: the step needs {need} blocks of {self.pool.block_size} tokens, "
                f"{free} of {self.pool.num_blocks} are free")

    def _admitted(self, msg: pb.Batch) -> ShardBatch:
        """A new batch to prefill, validated against the cached ones."""
        if msg.id in self.batches:
            raise InvalidArgument(f"batch {msg.id} is already cached")
        batch = ShardBatch.from_pb(msg, self.config)
        cached = {rid: b.id for b in self.batches.values() for rid in b.request_ids}
        clash = [rid for rid in batch.request_ids if rid in cached]
        if clash:
            raise InvalidArgument(f"batch {batch.id}: request id {clash[0]} is already in cached batch {cached[clash[0]]}")
        return batch

    def prefill(self, req: pb.PrefillRequest, parent: Context | None = None) -> pb.PrefillResponse:
        start = time.perf_counter_ns()
        if self.capacity is None:
            raise FailedPrecondition("prefill before warmup: call Warmup first")
        batch = self._admitted(req.batch)
        self._check_room(batch)
        self._check_blocks([], batch)
        with self.tracer.start_as_current_span("worker.prefill", context=parent, attributes={
                "glm.rank": self.ctx.rank, "glm.batch_id": batch.id, "glm.batch_size": len(batch.requests),
                "glm.tokens": sum(len(r.prefill_ids) for r in batch.requests)}) as span:
            t0 = time.perf_counter_ns()
            result = self._guarded(lambda: self._prefill(batch, span), f"batch {batch.id}")
            forward = time.perf_counter_ns() - t0
        return self._store(pb.PrefillResponse, result, forward_ns=forward,
                           total_ns=time.perf_counter_ns() - start)

    def decode(self, req: pb.DecodeRequest, parent: Context | None = None) -> pb.DecodeResponse:
        start = time.perf_counter_ns()
        listed_batches = list(req.batches)
        if req.ahead:
            problem = ahead_problem(req)
            if problem:
                raise InvalidArgument(problem)
            listed_batches = [b for b in listed_batches if b.id in self.batches]   # the others finished
            if not listed_batches:
                return pb.DecodeResponse(total_ns=time.perf_counter_ns() - start)
        if not listed_batches and not req.HasField("admit"):
            raise InvalidArgument("decode: no batches listed and none admitted")
        ids = [b.id for b in listed_batches]
        for listed in listed_batches:
            if ids.count(listed.id) > 1:
                raise InvalidArgument(f"decode: batch {listed.id} is listed twice")
            held = self.batches.get(listed.id)
            if held is None:
                raise InvalidArgument(f"decode: unknown batch id {listed.id} (cached: {sorted(self.batches)})")
            if listed.request_ids and list(listed.request_ids) != held.request_ids:
                raise InvalidArgument(f"decode: batch {listed.id} holds requests {held.request_ids}, "
                                      f"the call lists {list(listed.request_ids)}")
        admit = None
        if req.HasField("admit"):
            if self.capacity is None:
                raise FailedPrecondition("decode with admitted requests before warmup: call Warmup first")
            admit = self._admitted(req.admit)
            self._check_room(admit)
        self._check_blocks([self.batches[i] for i in ids], admit)
        batches = [self.batches.pop(i) for i in ids]          # dropped for good if the step fails
        rows = sum(len(b.requests) for b in batches) + (len(admit.requests) if admit else 0)
        try:
            with self.tracer.start_as_current_span("worker.decode", context=parent, attributes={
                    "glm.rank": self.ctx.rank, "glm.batch_id": ids[0] if ids else admit.id,
                    "glm.batch_size": rows, "glm.admitted": len(admit.requests) if admit else 0}) as span:
                t0 = time.perf_counter_ns()
                batch = ShardBatch.concatenate(batches) if batches else None
                t1 = time.perf_counter_ns()
                result = self._guarded(lambda: self._step(batch, admit, span), f"batch(es) {ids}")
                forward = time.perf_counter_ns() - t1
        except BaseException:
            for b in batches:
                b.release()
            raise
        return self._store(pb.DecodeResponse, result, forward_ns=forward, concat_ns=t1 - t0,
                           total_ns=time.perf_counter_ns() - start)

    def _store(self, response_type, result: StepOutput, **timings):
        rank0 = self.ctx.rank == 0
        out = response_type(generations=generations_pb(result) if rank0 else [],
                            failed=failures_pb(result) if rank0 else [], **timings)
        if result.batch is not None:
            self.batches[result.batch.id] = result.batch
            out.batch.CopyFrom(result.batch.to_pb())
        return out

    def filter_batch(self, req: pb.FilterBatchRequest, parent: Context | None = None) -> pb.FilterBatchResponse:
        held = self.batches.get(req.batch_id)
        if held is None:
            raise InvalidArgument(f"filter: unknown batch id {req.batch_id} (cached: {sorted(self.batches)})")
        kept = held.filter(list(req.keep_request_ids))
        out = pb.FilterBatchResponse()
        if kept is None:
            del self.batches[req.batch_id]
        else:
            self.batches[req.batch_id] = kept
            out.batch.CopyFrom(kept.to_pb())
        return out

    def clear_cache(self, req: pb.ClearCacheRequest, parent: Context | None = None) -> pb.ClearCacheResponse:
        dropped = [self.batches.pop(req.batch_id, None)] if req.HasField("batch_id") else list(self.batches.values())
        if not req.HasField("batch_id"):
            self.batches.clear()
            if self.engine.prompts is not None:      # every cache: the recent contexts too
                self.engine.prompts.clear()
        for batch in dropped:
            if batch is not None:
                batch.release()
        return pb.ClearCacheResponse()
