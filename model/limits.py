"""The ranges a request's parameters must lie in, shared by every process (torch-free).

``model.sampling.SamplingParams`` (the workers, ``glm generate``) and the gateway's
validation (``services.gateway.validation``) check against these same constants, so
the gateway accepts exactly what the workers accept (docs/model.md, "Generation"):

* ``temperature``: 0 (greedy) or in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``. Below
  ``1e-5`` a draw is the argmax in all but name (fp32 logits divided by it are ~1e6
  apart); refusing it keeps the request meaningful and the math far from overflow.
* ``top_p`` in ``[0, 1]`` (0 or 1 = off), ``top_k >= 0`` (0 = off).
* ``repetition_penalty`` in ``[MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY]``
  (1 = off): a logit is divided or multiplied by it, so it must be positive and bounded.
* ``presence_penalty``, ``frequency_penalty`` in ``PENALTY_RANGE`` (OpenAI's range).
* ``MAX_BLANKS``: the most blanks one request fills (one generation phase each); a
  prompt with more masks of the kind it fills is refused. With ``max_new_tokens`` per
  blank this bounds the tokens a request generates in all.
"""

from __future__ import annotations

MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 1e-2
MAX_REPETITION_PENALTY = 100.0
PENALTY_RANGE = (-2.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
MAX_BLANKS = 256


def temperature_problem(value: float) -> str:
    """Why ``value`` is not an accepted temperature ("" when it is); NaN is refused."""
    if value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        return ""
    return f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"


def range_problem(value: float, low: float, high: float) -> str:
    """Why ``value`` is outside ``[low, high]`` ("" when inside); NaN is outside."""
    if low <= value <= high:
        return ""
    return f"must be in [{low:g}, {high:g}]"


def repetition_penalty_problem(value: float) -> str:
    return range_problem(value, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)


def blanks_problem(blanks: int) -> str:
    """Why a prompt with ``blanks`` masks of the kind it fills is refused ("" when not)."""
    if blanks <= MAX_BLANKS:
        return ""
    return f"holds {blanks} blanks to fill, at most {MAX_BLANKS}"
