"""The one decoding engine: how a batch of blanks becomes tokens, for every caller.

``glm generate`` (``model.generation.Generator``) and the worker's Prefill/Decode
(``services.worker.shard``) both decode through ``Engine``; the worker only
translates protobuf to and from the row types (``model.rows``, re-exported here). The
rules live here once:

* a row may generate ``allowed_new_tokens`` tokens in all (its ``max_new_tokens``,
  cut to what fits in ``max_sequence_length`` after ``context + sop``);
* while a row has generated fewer than ``min_new_tokens``, eop and eos are banned;
* rank 0 alone samples (``model.sampling.Sampler``: penalties, temperature, top-k/top-p,
  the draw for a row's k-th token seeded from ``(seed, k)`` alone) and broadcasts the ids;
  every rank appends the *broadcast* ids, so the ranks' states cannot diverge;
* a row finishes with ``stop`` on eop/eos, with ``length`` once it has generated what it
  is allowed; finished rows leave the batch in the step that finished them;
* a row whose sampling raises on its own (rank 0 retries the rows one by one when the
  batched draw raises) *fails*: rank 0 broadcasts ``FAILED`` as its id, every rank drops
  it from the batch, and the step reports it (``StepOutput.failed``) while the other
  rows go on. When every row of a batch of several fails, the fault is not one row's:
  the exception propagates.

Prefill is whole-prompt (GLM's prefix-LM attention forbids chunking): ``context`` attends
bidirectionally, ``sop + generated`` causally, with the positions of ``model.prompt.Blank``
(docs/model.md, "Positions" and "Masks"). A row resumed with generated ids re-reads them in
its prefill and continues exactly.

Two caches. With a ``pool`` (``model.paged_kv.BlockPool``, the workers' case) every step is
one packed forward, ``mixed``: the running rows feed their pending tokens and the admitted
rows their prompts in the same forward, and rows hold blocks of the pool; a step that only
decodes replays a CUDA graph when ``graphs`` (``model.cuda_graphs``) is set. Without a pool (``glm
generate``, beam search) the dense cache of ``model.kv_cache``: a left-padded
prefill per new batch; the engine needs only what ``model.kv_cache.DecodeCache`` lists of it
and gets it from a factory ``(rows, capacity) -> cache`` (``GLMModel.new_cache`` by default),
so another dense cache can plug in without touching the decoding rules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from model.beam_search import BeamSearch
from model.config import END_IDS
from model.glm import GLMModel
from model.kv_cache import DecodeCache
from model.paged_kv import BlockPool, PagedCache, PagedStep, PoolExhausted, PromptCache, blocks_for
from model.rows import (FAILED, LENGTH, STOP, Batch, BeamOptions, RequestState, RowFailure, StepOutput, StepToken,
                        UnknownRequest, allowed_new_tokens, beam_groups, shared_prefills)
from model.sampling import Sampler

# The rows and batches live in ``model.rows``; callers take them from here with the engine.
__all__ = ["FAILED", "LENGTH", "STOP", "AdmissionPlan", "Batch", "BeamGroup", "BeamOptions", "CacheFactory", "Engine", "RequestState",
           "RowFailure", "StepOutput", "StepToken", "UnknownRequest", "allowed_new_tokens", "ban_end_tokens",
           "beam_groups", "shared_prefills"]

CacheFactory = Callable[[int, int], DecodeCache]   # (rows, capacity in slots) -> empty cache


@dataclass(frozen=True)
class AdmissionPlan:
    """How one step takes its admitted rows ``new``: ``hits`` (row -> the prompt cache's
    blocks and tokens, under ``keys``) read their context from the cache and feed ``sop``
    alone; the other rows (``misses``) prefill, once per distinct prompt (``unique`` indexes
    ``misses``; ``source[m]`` is miss ``m``'s place among the prefilled prompts)."""

    new: Sequence[RequestState]
    hits: dict[int, tuple[list[int], int]]
    keys: list[tuple]
    misses: list[int]
    unique: list[int]
    source: list[int]

    @property
    def prefilled(self) -> list[RequestState]:
        return [self.new[self.misses[u]] for u in self.unique]


class BeamGroup:
    """The live beams of one request: consecutive rows of a batch (one before its first
    step, ``num_beams`` after), which fork (a beam continued twice shares its blocks) and
    die (a beam not continued leaves) every step. ``tokens`` ``[1, beams, seq]`` is every
    beam's whole sequence, context included (the n-gram bans and the length penalty read
    it); every rank keeps it from the broadcast choices. ``search`` decides on rank 0 only."""

    def __init__(self, state: "RequestState") -> None:
        opts = state.beam
        self.search = BeamSearch(
            batch_size=1, num_beams=opts.num_beams, length_penalty=opts.length_penalty, consider_end=True,
            end_tokens=END_IDS, no_repeat_ngram_size=opts.no_repeat_ngram_size, min_gen_length=state.min_new,
            deterministic=opts.deterministic, seed=opts.seed)
        self.num_beams = opts.num_beams
        self.tokens = torch.tensor([state.blank.input_ids], dtype=torch.long)[None]
        self.steps = 0
        self.start = len(state.blank.input_ids)     # generated tokens begin here in ``tokens``


def ban_end_tokens(logits: torch.Tensor, ban: Sequence[bool]) -> torch.Tensor:
    """``logits [b, V]`` with eop/eos at -inf in the rows where ``ban`` is True
    (``min_new_tokens``); the input itself when no row is banned, else a copy."""
    rows = [i for i, banned in enumerate(ban) if banned]
    if not rows:
        return logits
    scores = logits.clone()
    _set_end(scores, rows, -float("inf"))
    return scores


def _set_end(logits: torch.Tensor, rows: list[int], value) -> torch.Tensor:
    """Write ``value`` (a scalar or ``[len(rows), len(END_IDS)]``) at eop/eos of ``rows``,
    in place; the entries that were there before."""
    r = torch.tensor(rows, device=logits.device)[:, None]
    c = torch.tensor(END_IDS, device=logits.device)[None, :]
    before = logits[r, c]
    logits[r, c] = value if isinstance(value, torch.Tensor) else torch.full_like(before, value)
    return before


class Engine:
    """Prefill, decode and step batches of ``RequestState`` rows on one rank's model shard.

    Every rank runs the same calls in the same order (the same forwards, the same
    collectives); ``step`` is where rank 0's choice becomes every rank's state.
    """

    def __init__(self, model: GLMModel, new_cache: CacheFactory | None = None,
                 pool: BlockPool | None = None, prompt_cache: bool = False) -> None:
        self.model = model
        self.ctx = model.ctx
        self.device = model.device
        self.new_cache: CacheFactory = new_cache or model.new_cache
        self.graphs = None   # a model.cuda_graphs.PagedDecodeGraphs over ``pool``: decode at bucketed shapes
        self.pool = pool     # set: batches live in this block pool, every step is one packed forward
        self.prompt_cache = prompt_cache   # keep recent contexts in the pool (``prompts``)
        self._prompts: PromptCache | None = None

    @property
    def prompts(self) -> PromptCache | None:
        """The pool's recent contexts (``model.paged_kv.PromptCache``); None without a pool or
        with ``prompt_cache`` off."""
        if self.pool is None or not self.prompt_cache:
            return None
        if self._prompts is None or self._prompts.pool is not self.pool:
            self._prompts = PromptCache(self.pool)
        return self._prompts

    # -- forward primitives (beam search uses them too) -------------------------------------
    def prefill_logits(self, batch: Batch) -> torch.Tensor:
        """Prefill every row into a new cache (``batch.cache``, room for ``width + longest
        remaining`` slots); the logits ``[b, V]`` of each row's last token, in the model's
        compute dtype (callers widen what they use: ``.float()`` is exact)."""
        ids, pos, valid, prefix = batch.prefill_inputs(self.device)         # [b, w] each
        cache = self.new_cache(len(batch.requests), batch.width + batch.max_remaining)
        mask = cache.extend(valid, prefix)                                   # [b, 1, w, w]
        logits = self.model(ids, pos, mask, cache, last_only=True, float_logits=False, valid=valid)   # [b, 1, V]
        batch.cache = cache
        return logits[:, -1]

    def decode_logits(self, cache: DecodeCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: ``tokens [b]`` at ``positions [b, 1]``; logits ``[b, V]``
        in the compute dtype."""
        b = tokens.shape[0]
        ones = torch.ones((b, 1), dtype=torch.bool, device=self.device)
        mask = cache.extend(ones, ~ones)                                     # [b, 1, 1, t]
        logits = self.model(tokens.view(b, 1).to(self.device), positions.to(self.device), mask, cache,
                            float_logits=False)                              # [b, 1, V]
        return logits[:, -1]                                                 # [b, V]

    # -- whole steps ----------------------------------------------------------------------
    def prefill(self, batch: Batch) -> StepOutput:
        """Prefill a new batch and choose every row's next token."""
        if self.pool is not None:
            return self.mixed(None, batch)
        logits = self.prefill_logits(batch)
        batch.sampler = Sampler([r.params for r in batch.requests], device=self.device)
        return self.step(batch, logits)

    def decode(self, batch: Batch) -> StepOutput:
        """Feed every row's pending token and choose its next one."""
        if self.pool is not None:
            return self.mixed(batch, None)
        logits = self.decode_logits(batch.cache, batch.pending, batch.decode_positions(self.device))
        return self.step(batch, logits)

    def plan_admission(self, admit: Batch | None) -> "AdmissionPlan":
        """How ``mixed`` takes the admitted rows of ``admit`` (nothing changes; see
        ``AdmissionPlan``): computed once per step and handed to ``blocks_needed``/``free_for``."""
        new = admit.requests if admit is not None else []
        prompts, hits, keys = self.prompts, {}, []
        for i, r in enumerate(new):
            if not r.generated and prompts is not None:
                key = PromptCache.key(r.blank)
                entry = prompts.entries.get(key)
                if entry is not None:
                    hits[i] = entry
                    keys.append(key)
        misses = [i for i in range(len(new)) if i not in hits]
        unique, source = shared_prefills([new[i] for i in misses])
        return AdmissionPlan(new, hits, keys, misses, unique, source)

    def blocks_needed(self, running: Batch | None, admit: Batch | None, plan: "AdmissionPlan | None" = None) -> int:
        """Fresh blocks of ``self.pool`` that ``mixed(running, admit)`` takes: a cached context
        takes one (its first write copies the shared last block, or opens the next), admitted
        rows with the same prompt prefill it once (``shared_prefills``)."""
        need = running.cache.blocks_to_append([1] * len(running.requests)) if running is not None else 0
        if admit is not None:
            plan = plan or self.plan_admission(admit)
            need += len(plan.hits) + sum(blocks_for(len(r.prefill_ids), self.pool.block_size) for r in plan.prefilled)
        return need

    def free_for(self, need: int, plan: "AdmissionPlan | None" = None) -> int:
        """The pool's free blocks once the prompt cache gave back what a step that takes ``need``
        blocks lacks (never a context the step's ``plan`` reads)."""
        if self.prompts is None:
            return self.pool.free_blocks
        return self.prompts.make_room(need, plan.keys if plan is not None else ())

    def mixed(self, running: Batch | None, admit: Batch | None) -> StepOutput:
        """One step of the ``running`` rows (each feeds its pending token) and the ``admit`` rows
        (each prefills ``context + sop + generated``), rows in that order, under ``running``'s id
        (else ``admit``'s). With a pool: one packed forward, and ``PoolExhausted`` before anything
        changes when the pool is short; without one, a prefill and a decode."""
        if running is None and admit is None:
            raise ValueError("a step needs running or admitted rows")
        if self.pool is None:
            parts = [self.decode(running) if running is not None else None,
                     self.prefill(admit) if admit is not None else None]
            parts = [p for p in parts if p is not None]
            kept = [p.batch for p in parts if p.batch is not None]
            return StepOutput(type(kept[0]).concatenate(kept) if kept else None,
                              [t for p in parts for t in p.tokens], [f for p in parts for f in p.failed])
        plan = self.plan_admission(admit)
        need = self.blocks_needed(running, admit, plan)
        free = self.free_for(need, plan)
        if need > free:
            raise PoolExhausted(f"KV pool: this step needs {need} blocks, {free} of {self.pool.num_blocks} free")
        decode_rows = len(running.requests) if running is not None else 0
        new, hits, misses, source, prefilled = plan.new, plan.hits, plan.misses, plan.source, plan.prefilled
        cached = sorted(hits)                     # they feed sop as decode rows, after the running ones
        for key in plan.keys:
            self.prompts.touch(key)
        reused = PagedCache(self.pool, [list(hits[i][0]) for i in cached], [hits[i][1] for i in cached])
        for table in reused.tables:
            self.pool.share(table)
        fresh = PagedCache(self.pool)
        fresh.add_rows(len(prefilled))
        cache = PagedCache.concatenate(([running.cache] if running is not None else []) + [reused, fresh])
        ids, pos = [], []
        if running is not None:
            ids.append(running.pending.to(self.device))
            pos.append(running.decode_positions(self.device).view(-1))
        if cached:
            ids.append(torch.tensor([new[i].prefill_ids[-1] for i in cached], device=self.device))
            pos.append(torch.tensor([new[i].prefill_positions[-1] for i in cached], device=self.device))
        if prefilled:
            ids.append(torch.tensor([t for r in prefilled for t in r.prefill_ids], device=self.device))
            pos.append(torch.tensor([p for r in prefilled for p in r.prefill_positions], device=self.device))
        samplers = [running.sampler] if running is not None else []
        if new:
            samplers.append(Sampler([r.params for r in new], device=self.device))
        first = running if running is not None else admit
        try:
            logits = None
            if not new and self.graphs is not None:
                logits = self.graphs.decode(cache, ids[0], pos[0])         # None: run eagerly
            if logits is None:
                step = PagedStep.build(cache, decode_rows + len(cached),
                                       [(len(r.prefill_ids), r.blank.context_length) for r in prefilled])
                logits = self.model.step_logits(torch.cat(ids), torch.cat(pos), step)
            first_prefill = decode_rows + len(cached)
            for u, r in enumerate(prefilled if self.prompts is not None else ()):   # kept for the next
                self.prompts.insert(PromptCache.key(r.blank), cache.tables[first_prefill + u], r.blank.context_length)
            place = {i: decode_rows + k for k, i in enumerate(cached)}
            place.update({i: first_prefill + source[m] for m, i in enumerate(misses)})
            rows = list(range(decode_rows)) + [place[i] for i in range(len(new))]
            if rows != list(range(len(rows))):    # back to admission order; shared prompts share blocks
                cache = cache.select(rows)
                logits = logits[torch.tensor(rows, device=logits.device)]
            batch = type(first)(first.id, (running.requests if running is not None else []) + new, cache,
                                Sampler.concatenate(samplers))
            return self.step(batch, logits)
        except BaseException:
            cache.release()                      # the rows are dropped: their blocks go back
            raise

    def choose(self, batch: Batch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """Rank 0 samples ``[b]`` ids from ``logits [b, V]`` (end tokens banned below
        ``min_new_tokens``) and broadcasts them; every rank returns the broadcast ids
        (``FAILED`` for a row whose sampling failed) and, on rank 0, why each failed row did.
        The ban is written into ``logits`` and undone before returning (no copy)."""
        reqs = batch.requests
        tokens = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
        errors: dict[int, str] = {}
        if self.ctx.rank == 0:
            banned = [i for i, r in enumerate(reqs) if len(r.generated) < r.min_new]
            with torch.inference_mode(logits.is_inference()):     # the ban is written in place
                saved = _set_end(logits, banned, -float("inf")) if banned else None
            try:
                try:
                    chosen = batch.sampler.choose(logits, [r.blank.context for r in reqs],
                                                  [r.generated for r in reqs])
                except Exception as exc:  # noqa: BLE001 - attributed to rows below, or re-raised
                    chosen, errors = self._choose_rows(batch, logits, exc)
            finally:
                if saved is not None:
                    with torch.inference_mode(logits.is_inference()):
                        _set_end(logits, banned, saved)
            tokens.copy_(chosen)
        return self.ctx.broadcast(tokens), errors

    @staticmethod
    def _choose_rows(batch: Batch, scores: torch.Tensor, batched: Exception) -> tuple[torch.Tensor, dict[int, str]]:
        """The batched draw raised: draw each row alone (a row's draw does not depend on its
        neighbours); the rows that raise alone fail. Re-raise when every row of several does."""
        tokens = torch.full((len(batch.requests),), FAILED, dtype=torch.long, device=scores.device)
        errors: dict[int, str] = {}
        for row, req in enumerate(batch.requests):
            try:
                chosen = batch.sampler.rows([row]).choose(scores[row: row + 1], [req.blank.context],
                                                          [req.generated])
                tokens[row] = chosen[0]
            except Exception as exc:  # noqa: BLE001 - this row's own failure, reported to its caller
                errors[row] = f"sampling failed: {type(exc).__name__}: {exc}"
        if len(errors) == len(batch.requests) > 1:
            raise batched
        return tokens, errors

    def _logprobs(self, batch: Batch, logits: torch.Tensor, tokens: torch.Tensor):
        """On rank 0, for the rows that asked only: the raw fp32 log-softmax of each chosen
        token ``{row: logprob}`` and its ``top_n`` best ``{row: ((id, logprob), ...)}``."""
        rows = [i for i, r in enumerate(batch.requests) if (r.logprobs or r.top_n) and r.beam is None]
        if self.ctx.rank != 0 or not rows:
            return {}, {}
        every = len(rows) == len(batch.requests)
        index = torch.tensor(rows, device=logits.device)
        raw = torch.log_softmax((logits if every else logits[index]).float(), dim=-1)   # [r, V]
        chosen = raw.gather(1, (tokens if every else tokens[index]).clamp(min=0)[:, None])[:, 0].tolist()
        logprobs = {row: lp for row, lp in zip(rows, chosen)}
        top_n = max(batch.requests[i].top_n for i in rows)
        top: dict[int, tuple] = {}
        if top_n:
            values, indices = raw.topk(top_n, dim=-1)                            # [r, top_n]
            values, indices = values.tolist(), indices.tolist()
            for k, row in enumerate(rows):
                n = batch.requests[row].top_n
                if n:
                    top[row] = tuple(zip(indices[k][:n], values[k][:n]))
        return logprobs, top

    def step(self, batch: Batch, logits: torch.Tensor) -> StepOutput:
        """Choose, broadcast and append one token per row; decide who finished (eop/eos:
        stop; the allowed count reached: length) and drop those rows and the failed ones.
        The rows of a beam search step together (``_beam_step``): they fork and die."""
        groups = beam_groups(batch.requests)
        tokens, errors = self.choose(batch, logits)
        beams = self._beam_step(batch, logits, groups) if groups else {}
        logprobs, top = self._logprobs(batch, logits, tokens)
        out, failed = [], []
        index: list[int] = []                   # source row of each row of the next batch
        pending: list[int] = []
        requests: list[RequestState] = []
        token_list = tokens.tolist()
        row = 0
        while row < len(batch.requests):
            req = batch.requests[row]
            if row in groups:
                self._beam_rows(batch, row, beams[row], out, failed, index, pending, requests)
                row += groups[row]
                continue
            tok = token_list[row]
            if tok == FAILED:
                failed.append(RowFailure(req, errors.get(row, f"sampling failed on rank 0 (row {row})")))
                row += 1
                continue
            req.generated.append(tok)
            reason = STOP if tok in END_IDS else LENGTH if len(req.generated) >= req.allowed else None
            if reason is None:
                index.append(row)
                pending.append(tok)
                requests.append(req)
            out.append(StepToken(req, tok, logprobs.get(row, 0.0), len(req.generated), reason, top.get(row, ())))
            row += 1
        batch.pending = tokens
        if not index:
            batch.release()
            return StepOutput(None, out, failed)
        kept = batch.rows(index)
        kept.requests = requests
        kept.pending = torch.tensor(pending, dtype=torch.long, device=tokens.device)
        return StepOutput(kept, out, failed)

    def _beam_step(self, batch: Batch, logits: torch.Tensor, groups: dict[int, int]) -> dict[int, tuple]:
        """Rank 0 steps every beam search of the batch over its rows' logits and broadcasts,
        per group, ``[status, new token of each beam, source row of each beam]`` (status 1:
        the search is done, -1: it failed); every rank returns ``{first row: (failure, done,
        tokens, sources, candidates)}`` (failure: None, or why it failed; done: finished now, by
        the search or its length; candidates: rank 0 only, once done)."""
        layout = []
        for first, size in groups.items():
            req = batch.requests[first]
            if req.group is None:
                req.group = BeamGroup(req)
            layout.append((first, size, req.group))
        payload = torch.zeros(sum(1 + 2 * g.num_beams for _, _, g in layout), dtype=torch.long)
        errors: dict[int, str] = {}
        if self.ctx.rank == 0:
            at = 0
            for first, size, group in layout:
                k = group.num_beams
                try:
                    new_tokens, source = group.search.step(logits[first:first + size].float()[None].cpu(),
                                                           group.tokens)
                    payload[at] = 1 if group.search.is_done else 0
                    payload[at + 1: at + 1 + k] = new_tokens[0, :, -1]
                    payload[at + 1 + k: at + 1 + 2 * k] = source[0]
                except Exception as exc:  # noqa: BLE001 - this request's own failure, reported to its caller
                    payload[at] = -1
                    errors[first] = f"beam search failed: {type(exc).__name__}: {exc}"
                at += 1 + 2 * k
        payload = self.ctx.broadcast(payload.to(self.device)).cpu().tolist()
        result, at = {}, 0
        for first, size, group in layout:
            k = group.num_beams
            status, new, src = payload[at], payload[at + 1: at + 1 + k], payload[at + 1 + k: at + 1 + 2 * k]
            at += 1 + 2 * k
            if status < 0:
                result[first] = (errors.get(first, "beam search failed on rank 0"), False, new, src, ())
                continue
            group.tokens = torch.cat([group.tokens[:, src], torch.tensor(new, dtype=torch.long).view(1, k, 1)], dim=-1)
            group.steps += 1
            done, candidates = status == 1 or group.steps >= batch.requests[first].allowed, ()
            if done and self.ctx.rank == 0:
                candidates = tuple((tuple(seq.tolist()[group.start:]), float(score))
                                   for seq, score in group.search.finalize(group.tokens)[0])
            result[first] = (None, done, new, src, candidates)
        return result

    def _beam_rows(self, batch: Batch, first: int, stepped: tuple, out: list, failed: list,
                   index: list, pending: list, requests: list) -> None:
        """The next rows of one beam search (new beam ``j`` continues row ``first + source[j]``
        with its new token), or its end: a ``StepToken`` with every candidate on rank 0."""
        failure, done, new, src, candidates = stepped
        req = batch.requests[first]
        group = req.group
        if failure is not None:
            failed.append(RowFailure(req, failure))
            return
        if done:
            best = candidates[0][0] if candidates else ()
            reason = STOP if best and best[-1] in END_IDS else LENGTH
            out.append(StepToken(req, new[0], 0.0, group.steps, reason, (), candidates))
            return
        for tok, s in zip(new, src):
            parent = batch.requests[first + s]
            index.append(first + s)
            pending.append(tok)
            requests.append(replace(parent, generated=parent.generated + [tok], group=group))
        out.append(StepToken(req, new[0], 0.0, group.steps, None))
