"""Options: one frozen dataclass per process kind is the single declaration of its settings.

A field declared with ``option(...)`` is a command-line flag (``--some-field``) and a
``GLM_`` variable (see ``services.common.env``). ``Options`` derives from those fields, and
nothing else: ``add_flags`` (the flags, with their defaults), ``from_args`` (the object
from parsed arguments; validation is the dataclass's ``__post_init__``) and ``to_argv``
(the flags that rebuild the object in a child process). A field whose type is another
``Options`` class composes it: its flags are added, parsed and rendered with the outer
ones. Fields without ``option`` are settings of the program, never of the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class Repeatable(argparse.Action):
    """A repeatable flag collecting a list. Its ``GLM_`` variable holds the values
    comma-separated; flags given on the command line replace the variable's."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest)
        if items is self.default or not isinstance(items, list):
            items = []
        setattr(namespace, self.dest, items + [values])


def repeated(value) -> list[str]:
    """The list a ``Repeatable`` flag holds (a ``GLM_`` variable's value is split on commas)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return list(value)


@dataclass(frozen=True)
class Flag:
    """How one field is a flag. ``parse``/``render`` convert between the flag's text (one
    item of a ``repeat`` flag) and the field's value; ``env`` names the ``GLM_`` variable
    when it is not ``GLM_<FIELD>`` (a name that would mean something else to another
    command); ``to`` (``glm serve`` only) names the child processes that use the setting."""

    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    name: str | None = None
    metavar: str | None = None
    env: str | None = None
    repeat: bool = False
    parse: Callable[[Any], Any] | None = None
    render: Callable[[Any], str] | None = None
    to: tuple[str, ...] = ()


def option(default: Any = MISSING, **flag) -> Any:
    """A dataclass field that is a command-line flag (no default: a required flag)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults are immutable values (use a tuple)")
    return dataclasses.field(default=default, metadata={"flag": Flag(**flag)})


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get("flag")


def flag_name(field: dataclasses.Field) -> str:
    flag = flag_of(field)
    return (flag.name if flag and flag.name else "--" + field.name.replace("_", "-"))


def compose(cls: type, **defaults) -> Any:
    """A field holding another ``Options`` class, whose flags are this class's too."""
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"compose": cls})


def _composed(field: dataclasses.Field) -> type | None:
    return field.metadata.get("compose")


class Options:
    """Mixin of the options dataclasses (``kw_only``, ``frozen``): flags from fields."""

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        for field in cls.option_fields():
            if (inner := _composed(field)) is not None:
                inner.add_flags(parser)
            elif (flag := flag_of(field)) is not None:
                _add_flag(parser, field, flag)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **settings):
        """The options of parsed ``args``; ``settings`` set the fields that are no flags."""
        values = {}
        for field in cls.option_fields():
            if (inner := _composed(field)) is not None:
                values[field.name] = inner.from_args(args)
            elif (flag := flag_of(field)) is not None:
                values[field.name] = _value(flag, getattr(args, field.name))
        return cls(**values, **settings)

    @classmethod
    def from_flat(cls, **settings):
        """Build from keyword arguments naming fields of this class or of the classes it
        composes (``ServeOptions.from_flat(dtype=...)`` sets ``ranks.dtype``)."""
        values = {}
        for field in cls.option_fields():
            inner = _composed(field)
            if field.name in settings:
                values[field.name] = settings.pop(field.name)
            elif inner is not None:
                names = {f.name for f in _all_fields(inner)}
                mine = {k: settings.pop(k) for k in list(settings) if k in names}
                values[field.name] = inner.from_flat(**mine)
        if settings:
            raise TypeError(f"{cls.__name__}: unknown setting(s) {', '.join(sorted(settings))}")
        return cls(**values)

    def to_argv(self) -> list[str]:
        """The flags that rebuild these options when parsed (``None`` fields are left out)."""
        argv: list[str] = []
        for field in self.option_fields():
            value = getattr(self, field.name)
            if _composed(field) is not None:
                argv += value.to_argv()
            elif (flag := flag_of(field)) is not None:
                argv += _render(flag_name(field), flag, value, field.default)
        return argv


def _all_fields(cls: type) -> list[dataclasses.Field]:
    found = []
    for field in dataclasses.fields(cls):
        inner = _composed(field)
        found += _all_fields(inner) if inner is not None else [field]
    return found


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, flag: Flag) -> None:
    kwargs: dict[str, Any] = {"dest": field.name, "help": flag.help}
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    if flag.choices is not None:
        kwargs["choices"] = list(flag.choices)
    if field.type in (bool, "bool"):      # default True: --flag/--no-flag
        kwargs["action"] = argparse.BooleanOptionalAction if field.default is True else "store_true"
    elif flag.repeat:
        kwargs["action"] = Repeatable
    if flag.type is not None:
        kwargs["type"] = flag.type
    if field.default is MISSING:
        kwargs["required"] = True
    elif flag.repeat:
        kwargs["default"] = None
    else:
        default = field.default
        kwargs["default"] = flag.render(default) if flag.render else default
    action = parser.add_argument(flag_name(field), **kwargs)
    if flag.env:
        action.glm_env = flag.env


def _value(flag: Flag, raw: Any) -> Any:
    if flag.repeat:
        items = [flag.type(item) if flag.type and isinstance(item, str) else item for item in repeated(raw)]
        return tuple(flag.parse(item) if flag.parse else item for item in items)
    return flag.parse(raw) if flag.parse else raw


def _render(name: str, flag: Flag, value: Any, default: Any = None) -> list[str]:
    if isinstance(value, bool):
        if default is True:
            return [name] if value else ["--no-" + name.removeprefix("--")]
        return [name] if value else []
    if flag.repeat:
        argv = []
        for item in value:
            argv += [name, flag.render(item) if flag.render else str(item)]
        return argv
    text = flag.render(value) if flag.render else value
    return [] if text is None else [name, str(text)]
