"""The one place that reads environment variables: ``GLM_<FLAG>`` defaults for flags.

Every command-line flag ``--some-flag`` can also be set as ``GLM_SOME_FLAG``; an
explicit flag wins over the environment.
"""

from __future__ import annotations

import argparse
import os

PREFIX = "GLM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(dest: str) -> str:
    return PREFIX + dest.upper()


def _convert(action: argparse.Action, raw: str, name: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        low = raw.strip().lower()
        if low not in _TRUE | _FALSE:
            raise ValueError(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")
        value = low in _TRUE
        return value if isinstance(action, argparse._StoreTrueAction) else not value
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
    """Set each optional flag's default from ``GLM_<DEST>`` when that variable is set."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_env_defaults(sub, environ)
            continue
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        name = env_name(action.dest)
        if name in environ:
            action.default = _convert(action, environ[name], name)
            action.required = False


def debug_enabled() -> bool:
    """``GLM_DEBUG=1`` shows tracebacks instead of one-line errors."""
    return os.environ.get(PREFIX + "DEBUG", "").strip().lower() in _TRUE
