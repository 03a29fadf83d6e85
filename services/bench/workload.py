"""The benchmark's requests: a fixed set of prompts, output lengths and Poisson arrival times,
all drawn from one seed, so that every batching mode sees exactly the same load."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# English and Chinese prompts of different lengths, with both kinds of blank: [MASK] (fill a
# short span inside the text) and [gMASK] (continue at the end). One blank each, so that a
# request's generated tokens are exactly its max_new_tokens (min_new_tokens = max_new_tokens).
PROMPTS: tuple[str, ...] = (
    "Short [MASK]",
    "The capital of the country is [MASK], a city by the river.",
    "Write a sentence about the sea. [gMASK]",
    "今天的天气很好，我们去[MASK]散步吧。",
    "请写一首关于秋天的诗。[gMASK]",
    "A tensor-parallel pool splits every weight matrix across its ranks; each rank holds one slice, "
    "computes its part of the product and joins the others in an all-reduce, so that [MASK] "
    "while the memory of one GPU holds only a fraction of the model.",
    "Continuous batching lets a new request join the running batch at the next decoding step "
    "instead of waiting for the whole batch to finish, which raises throughput when outputs "
    "have different lengths and keeps the time to the first token short under load. [gMASK]",
    "一个很长的句子，里面有很多很多的字，用来测试不同长度的提示词是否能被正确地批处理。"
    "服务器把新的请求放进正在运行的批次里，每一步解码都可以加入新的请求，[MASK]，"
    "这样吞吐量更高，首个词元的等待时间也更短。",
    "GLM-130B is a bilingual (English and Chinese) bidirectional dense model with 130 billion "
    "parameters, pre-trained with the General Language Model algorithm. It is designed to run "
    "inference on a single server with eight A100 (40G) or eight V100 (32G) GPUs, and with INT4 "
    "quantization on four RTX 3090 (24G). The model fills blanks marked in the text, and "
    "continues a text at the end when the blank is a generation mask. [gMASK]",
)


@dataclass(frozen=True)
class BenchRequest:
    """One request of a seeded benchmark workload: its arrival time, prompt and exact output
    length."""

    index: int
    at_s: float               # arrival, seconds after the start of the run
    prompt: str
    max_new_tokens: int       # also its min_new_tokens unless stop_after: the output length is exactly this
    seed: int                 # sampling seed (used when sampling is on)
    stop_after: int = 0       # > 0: sent with max_new_tokens as its limit, ended by the client after this many


# Prompts of a chosen length: common English words, about TOKENS_PER_WORD tokens each with the
# demo tokenizer (the 150 528-id vocabulary of every preset): 1 402 tokens for 1 000 words.
WORDS = tuple("the of and to in is that for it as was with be by on not he this are or his from at "
              "which but have an they you were her she there one all we their".split())
TOKENS_PER_WORD = 1.4


def synthetic_prompt(tokens: int, rng: random.Random) -> str:
    """A prompt of about ``tokens`` tokens: random common words and one blank, ``[gMASK]`` at the
    end (four in five) or ``[MASK]`` inside the text."""
    words = [rng.choice(WORDS) for _ in range(max(1, round((tokens - 1) / TOKENS_PER_WORD)))]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words) + 1), "[MASK]")
    else:
        words.append("[gMASK]")
    return " ".join(words)


def poisson_arrivals(count: int, rate: float, rng: random.Random) -> list[float]:
    """``count`` arrival times (seconds from 0) of a Poisson process of ``rate`` requests/s:
    exponential gaps of mean 1/rate, the first one included. ``rate`` <= 0 or infinite means
    every request arrives at 0 (a burst)."""
    if rate <= 0 or math.isinf(rate):
        return [0.0] * count
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times


def make_workload(count: int, *, rate: float, min_new_tokens: int, max_new_tokens: int,
                  seed: int, prompts: tuple[str, ...] = PROMPTS, prompt_tokens: tuple[int, int] | None = None,
                  early_stops: bool = False) -> list[BenchRequest]:
    """The requests of one run, deterministic in ``seed``: a prompt drawn uniformly from
    ``prompts`` (or, with ``prompt_tokens = (lo, hi)``, a ``synthetic_prompt`` of a length uniform
    in it), an output length uniform in [min_new_tokens, max_new_tokens], Poisson arrivals. With
    ``early_stops`` every request is sent with ``max_new_tokens`` as its limit and stops after its
    drawn length (the client ends it): a server cannot know when a request will stop."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 1 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need 1 <= min_new_tokens <= max_new_tokens, got {min_new_tokens}, {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts")
    if prompt_tokens is not None and not 2 <= prompt_tokens[0] <= prompt_tokens[1]:
        raise ValueError(f"prompt tokens: need 2 <= lo <= hi, got {prompt_tokens}")
    rng = random.Random(seed)
    arrivals = poisson_arrivals(count, rate, rng)
    out = []
    for i, at in enumerate(arrivals):
        prompt = synthetic_prompt(rng.randint(*prompt_tokens), rng) if prompt_tokens else rng.choice(prompts)
        length = rng.randint(min_new_tokens, max_new_tokens)
        out.append(BenchRequest(index=i, at_s=at, prompt=prompt,
                                max_new_tokens=max_new_tokens if early_stops else length,
                                seed=rng.randrange(1, 2**31), stop_after=length if early_stops else 0))
    return out
