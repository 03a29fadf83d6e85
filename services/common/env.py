"""The one place that reads environment variables: ``GLM_`` defaults for flags.

Every flag of a service command (``glm serve``, ``worker``, ``pool``, ``scheduler``,
``gateway``) ``--some-flag`` can also be set as ``GLM_SOME_FLAG``; a flag of a tool
(``glm generate``, ``plan``, ``client``, ...) as ``GLM_<TOOL>_SOME_FLAG``, its own
namespace. A few service flags have their own name where ``GLM_<FLAG>`` would mean
something else to another command (``GLM_GATEWAY_MODEL``, ``GLM_POOL_METRICS_PORT``,
``GLM_SERVE_METRICS_PORT``): one variable never means two things. An explicit flag
wins over the environment.
"""

from __future__ import annotations

import argparse
import os

PREFIX = "GLM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
INHERITED = (PREFIX + "DEBUG",)      # the only GLM_ variables a child process is given


def env_name(dest: str) -> str:
    """``GLM_<DEST>``: the variable of a flag without a name of its own."""
    return PREFIX + dest.upper()


def variable(action: argparse.Action) -> str:
    """The ``GLM_`` variable of a parsed flag (``glm_env`` when the flag names its own)."""
    return getattr(action, "glm_env", None) or env_name(action.dest)


def namespace(parser: argparse.ArgumentParser, command: str) -> None:
    """Give every flag of ``parser`` a variable ``GLM_<COMMAND>_<DEST>`` (a tool's namespace)."""
    prefix = PREFIX + command.upper().replace("-", "_") + "_"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                namespace(sub, f"{command}_{name}")
        elif action.option_strings and action.dest not in ("help", "version"):
            action.glm_env = prefix + action.dest.upper()


def _convert(action: argparse.Action, raw: str, name: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        low = raw.strip().lower()
        if low not in _TRUE | _FALSE:
            raise ValueError(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")
        value = low in _TRUE
        return not value if isinstance(action, argparse._StoreFalseAction) else value
    if action.type is None:
        value = raw
    else:
        try:
            value = action.type(raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"{name}={raw!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
    return value


def apply_env_defaults(parser: argparse.ArgumentParser, environ=None) -> None:
    """Set each optional flag's default from its ``GLM_`` variable when that is set."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_env_defaults(sub, environ)
            continue
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        name = variable(action)
        if name in environ:
            action.default = _convert(action, environ[name], name)
            action.required = False


def child_environ(environ=None) -> dict[str, str]:
    """The environment of a child process that ``glm`` starts with every setting in its argv:
    this one's, without the ``GLM_`` variables (but ``GLM_DEBUG``), so that a setting
    reaches a child only by a flag and never by inheritance."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not k.startswith(PREFIX) or k in INHERITED}


def quiet_openmp() -> None:
    """Make GNU OpenMP's threads sleep between parallel regions instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``) unless the environment chose a policy: a worker shares
    its cores with the gateway, the scheduler and Redis (docs/benchmarks.md, "Threads").
    Effective only before torch loads OpenMP."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def debug_enabled() -> bool:
    """``GLM_DEBUG=1`` shows tracebacks instead of one-line errors."""
    return os.environ.get(PREFIX + "DEBUG", "").strip().lower() in _TRUE
