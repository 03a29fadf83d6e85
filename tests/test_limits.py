"""One set of ranges (``model.limits``): the gateway accepts exactly the sampling values
the workers accept (``model.sampling.SamplingParams``), refusals name the field, and
the blank bound is the same in the gateway, the scheduler and ``glm generate``."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from model.config import GMASK_ID, MASK_ID
from model.limits import (MAX_BLANKS, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY,
                          MIN_TEMPERATURE)
from model.prompt import PromptError, check_blanks
from model.sampling import SamplingParams
from services.common.errors import InvalidArgument
from services.gateway.validation import prompt_ids_of, sampling_of
from services.proto_gen.glm.v1 import generation_pb2 as pb

SERVED = SimpleNamespace(vocab_size=150528, max_sequence_length=2048)
VALUES = {
    "temperature": [0.0, 1e-38, 1e-6, MIN_TEMPERATURE, 0.7, MAX_TEMPERATURE, 100.5, -0.1, math.inf, math.nan],
    "repetition_penalty": [1e-38, 0.005, MIN_REPETITION_PENALTY, 1.0, 1.3, MAX_REPETITION_PENALTY, 101.0, 0.0,
                           -1.0, math.inf, math.nan],
    "top_p": [0.0, 1e-9, 0.5, 1.0, 1.01, -0.1, math.nan],
    "presence_penalty": [-2.0, 0.0, 2.0, 2.01, -3.0, math.nan],
    "frequency_penalty": [-2.0, 1.5, 2.0, -2.01, math.inf],
}
CASES = [(f, v) for f, values in VALUES.items() for v in values]


def worker_accepts(**kwargs) -> bool:
    try:
        SamplingParams(**kwargs)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("field,value", CASES, ids=[f"{f}={v:g}" for f, v in CASES])
def test_the_gateway_accepts_exactly_what_the_workers_accept(field, value):
    try:
        sampling, _ = sampling_of(pb.SamplingOptions(**{field: value}), SERVED)
    except InvalidArgument as exc:
        assert str(exc).startswith(f"sampling.{field}:"), exc
        assert not worker_accepts(**{field: _as_float32(value)})
        return
    forwarded = getattr(sampling, field)              # what the scheduler sends the workers
    assert worker_accepts(**{field: forwarded}), (field, value, forwarded)


def _as_float32(value: float) -> float:
    return float(pb.SamplingOptions(temperature=value).temperature)


def test_the_blank_bound_is_one_constant():
    fits, over = [20100, MASK_ID] * MAX_BLANKS, [20100, MASK_ID] * (MAX_BLANKS + 1)
    check_blanks(fits)
    with pytest.raises(PromptError, match=f"at most {MAX_BLANKS}"):
        check_blanks(over)
    assert prompt_ids_of(pb.GenerateRequest(prompt_token_ids=fits), SERVED) == fits
    with pytest.raises(InvalidArgument, match=rf"^prompt_token_ids: .*at most {MAX_BLANKS}"):
        prompt_ids_of(pb.GenerateRequest(prompt_token_ids=over), SERVED)
    # only masks of the kind that is filled count: [gMASK]s stay when a [MASK] is there
    check_blanks([MASK_ID] + [GMASK_ID] * (MAX_BLANKS + 1))
