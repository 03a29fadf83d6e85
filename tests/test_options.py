"""The options classes (services/*/options.py, services/local_options.py): each one's argv
rebuilds it through the real parser, every ``glm serve`` option reaches the child process
that uses it, no ``GLM_`` variable means two things to two commands, and a child process
gets its settings by flags only (no ``GLM_`` variable is inherited)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import uuid
from pathlib import Path

import pytest

from services.cli.main import build_parser
from services.common.env import apply_env_defaults, child_environ, variable
from services.common.options import compose, flag_name, flag_of, option
from services.gateway.options import GatewayOptions
from services.local import LocalStack
from services.local_options import ServeOptions
from services.scheduler.options import SchedulerOptions
from services.worker.options import PoolOptions, RankOptions, WorkerOptions

COMMANDS = {"worker": WorkerOptions, "pool": PoolOptions, "scheduler": SchedulerOptions,
            "gateway": GatewayOptions, "serve": ServeOptions}
# What glm serve uses itself, not a child: the demo model's folder, how many pools, the
# demo call, the one metrics port (the hub; each child gets a loopback port of its own).
SERVE_ITSELF = {"cache_dir", "pools", "no_demo_call", "metrics_port"}


def leaves(cls) -> list[dataclasses.Field]:
    """The flag fields of ``cls`` and of the classes it composes."""
    found = []
    for field in dataclasses.fields(cls):
        inner = field.metadata.get("compose")
        found += leaves(inner) if inner else ([field] if flag_of(field) else [])
    return found


def distinct_value(field: dataclasses.Field, i: int):
    """A value for the ``i``-th flag field, unlike its default and every other field's."""
    flag, kind = flag_of(field), str(field.type)
    if flag.choices:
        text = flag.choices[-1]
        return flag.parse(text) if flag.parse else text
    if kind == "bool":
        return not field.default
    if kind.startswith("tuple[tuple"):
        return ((f"name{i}", f"/checkpoint{i}"),)
    if kind.startswith("tuple"):
        return (f"unix:///item{i}.sock",)
    if kind.startswith("int"):
        return 1000 - i                     # decreasing: rank < tp, default < limit
    if kind.startswith("float"):
        return 0.5 + i / 100                # in (0, 1): a ratio too
    return f"text{i}"


def distinct(cls, **fixed):
    """``cls`` with a distinct non-default value in every flag field (``fixed`` wins)."""
    settings = {f.name: distinct_value(f, i) for i, f in enumerate(leaves(cls))}
    return cls.from_flat(**(settings | fixed))


# The weights come from a checkpoint or are drawn for a preset, never both: a class with
# ``--load-format`` is checked twice, once per source, and every flag must differ from its
# default in one of the two.
CHECKPOINT_SOURCE = {"load_format": "auto", "preset": None, "num_layers": None}
DUMMY_SOURCE = {"load_format": "dummy", "preset": "glm-tiny", "num_layers": 1, "checkpoint": None}


def variants(cls, **fixed) -> list:
    """``distinct(cls)`` once per source of weights the class can name."""
    if "load_format" not in {f.name for f in leaves(cls)}:
        return [distinct(cls, **fixed)]
    dummy = DUMMY_SOURCE | ({"model_dir": "/dummy-model"} if cls is ServeOptions else {})
    return [distinct(cls, **(CHECKPOINT_SOURCE | fixed)), distinct(cls, **(dummy | fixed))]


def non_default(options, field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING or settings_of(options)[field.name] != field.default


def parse(argv: list[str], environ=None) -> argparse.Namespace:
    parser = build_parser()
    apply_env_defaults(parser, environ or {})
    return parser.parse_args(argv)


def leaf_values(value) -> set:
    """Every plain value inside an options object (fields, tuples, nested options)."""
    if dataclasses.is_dataclass(value):
        return set().union(*(leaf_values(getattr(value, f.name)) for f in dataclasses.fields(value)))
    if isinstance(value, tuple):
        return set().union(set(), *(leaf_values(v) for v in value))
    return {value}


def settings_of(options) -> dict:
    """Field name -> value, the composed classes' fields included (names are unique)."""
    found = {}
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        found |= settings_of(value) if field.metadata.get("compose") else {field.name: value}
    return found


def subparser(command: str) -> argparse.ArgumentParser:
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subs.choices[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_argv_rebuilds_the_options_through_the_real_parser(command):
    cls = COMMANDS[command]
    every = variants(cls, **({"rank": 1} if cls is WorkerOptions else {}))
    for field in leaves(cls):
        assert any(non_default(options, field) for options in every), field.name
    for options in every:
        rebuilt = cls.from_args(parse([command, *options.to_argv()]))
        programs = {f.name: getattr(options, f.name) for f in dataclasses.fields(cls)
                    if not flag_of(f) and not f.metadata.get("compose")}
        assert dataclasses.replace(rebuilt, **programs) == options


def test_argv_wins_over_the_environment():
    """A child parses its flags in an environment of its own: the argv decides (for every flag
    the argv holds: a checkpoint source leaves --num-layers unset, and so out of its argv)."""
    options = distinct(WorkerOptions, rank=1, **CHECKPOINT_SOURCE)
    env = {variable(a): ("1" if a.default else "0") if a.nargs == 0 else "9"   # a switch: its default
           for a in subparser("worker")._actions
           if a.option_strings and not a.choices and a.dest not in ("help", "num_layers")}
    assert WorkerOptions.from_args(parse(["worker", *options.to_argv()], env)) == options


def children(options: ServeOptions) -> dict[str, object]:
    """The options each child of a stack parses from the argv the stack launches it with."""
    stack = LocalStack(options)
    stack.redis_url = options.redis_url or "redis://127.0.0.1:6379/0"
    pool = options.pool("/tmp/glm-pool-test")
    worker = pool.workers()[-1]
    scheduler = stack.scheduler_argv(0, tuple(w.listen for w in pool.workers()), "pool-0")
    return {"worker": WorkerOptions.from_args(parse(worker.argv())),
            "scheduler": SchedulerOptions.from_args(parse(scheduler)),
            "gateway": GatewayOptions.from_args(parse(stack.gateway_argv()))}


def test_every_serve_option_reaches_the_child_that_uses_it():
    every = variants(ServeOptions)
    for field in leaves(ServeOptions):
        flag = flag_of(field)
        if field.name in SERVE_ITSELF:
            assert not flag.to, f"{flag_name(field)} is glm serve's own and names children {flag.to}"
            continue
        assert flag.to, f"glm serve {flag_name(field)}: no child uses it (name them in Flag.to)"
        assert any(non_default(options, field) for options in every), field.name
    for options in every:
        received = {name: leaf_values(child) for name, child in children(options).items()}
        for field in leaves(ServeOptions):
            if field.name in SERVE_ITSELF or not non_default(options, field):
                continue
            value = settings_of(options)[field.name]
            for child in flag_of(field).to:
                assert value in received[child], f"glm serve {flag_name(field)} {value!r} never reaches the {child}"


def test_with_dummy_weights_the_scheduler_and_gateway_read_the_model_folder():
    """No checkpoint reaches any child; the model folder (config.json + tokenizer) reaches the
    two processes that read it."""
    options = variants(ServeOptions)[1]
    got = children(options)
    assert got["worker"].checkpoint is None and got["worker"].load_format == "dummy"
    assert got["scheduler"].checkpoint == "/dummy-model"
    assert got["gateway"].models == ((options.model_name, "/dummy-model"),)


def test_serve_tokenizer_reaches_the_scheduler_and_the_gateway():
    """The bug this design removed: ``--tokenizer`` was accepted and never passed on."""
    args = parse(["serve", "--checkpoint", "/ckpt", "--model-name", "m", "--tokenizer", "/tok/ice_text.model"])
    got = children(ServeOptions.from_args(args))
    assert got["scheduler"].tokenizer == got["gateway"].tokenizer == "/tok/ice_text.model"


# ---- GLM_ variables: one meaning each ----

def _core(text: str | None) -> str:
    """A flag's help without its remarks: ``(default: ...)`` and the ``[GLM_...]`` suffix."""
    text = text or ""
    while True:
        shorter = re.sub(r"\s*[(\[][^()\[\]]*[)\]]", "", text)
        if shorter == text:
            return " ".join(text.split()).lower()
        text = shorter


def meaning(action: argparse.Action) -> tuple:
    """What a flag means: its value's name, kind, type, choices and help (without remarks)."""
    return (action.dest, type(action).__name__, getattr(action.type, "__name__", action.type),
            tuple(action.choices or ()), _core(action.help))


def flag_meanings(parser: argparse.ArgumentParser, command: str = "glm") -> dict[str, dict[tuple, list[str]]]:
    """``GLM_`` variable -> meaning -> the commands whose flag it sets with that meaning."""
    found: dict[str, dict[tuple, list[str]]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for var, meanings in flag_meanings(sub, f"{command} {name}").items():
                    for key, commands in meanings.items():
                        found.setdefault(var, {}).setdefault(key, []).extend(commands)
        elif action.option_strings and action.dest != "help":
            found.setdefault(variable(action), {}).setdefault(meaning(action), []).append(command)
    return found


def collisions(parser: argparse.ArgumentParser) -> dict[str, dict[tuple, list[str]]]:
    return {var: m for var, m in flag_meanings(parser).items() if len(m) > 1}


def test_no_variable_means_two_things_to_two_commands():
    assert collisions(build_parser()) == {}


def test_shared_variables_are_the_service_settings():
    """The variables several commands share (so one ConfigMap or one shell sets them for all)."""
    shared = {var for var, m in flag_meanings(build_parser()).items() if len(next(iter(m.values()))) > 1}
    assert {"GLM_CHECKPOINT", "GLM_TP", "GLM_DTYPE", "GLM_QUANT", "GLM_OTLP_ENDPOINT", "GLM_TOKENIZER",
            "GLM_REDIS_URL", "GLM_MODEL_NAME"} <= shared
    own = {"GLM_PLAN_MODEL", "GLM_GATEWAY_MODEL", "GLM_SERVE_METRICS_PORT", "GLM_POOL_METRICS_PORT"}
    assert own <= set(flag_meanings(build_parser())) and not own & shared


def test_the_check_catches_the_old_collisions():
    """``--metrics-port`` (serve's one port vs a process's own) and ``--model`` (a preset in
    glm plan, a served name elsewhere) once shared their variable; the check fails on that."""
    parser = argparse.ArgumentParser()
    subs = parser.add_subparsers()
    serve, worker, plan, scheduler = (subs.add_parser(n) for n in ("serve", "worker", "plan", "scheduler"))
    serve.add_argument("--metrics-port", type=int, help="the metrics of every process on this one port")
    worker.add_argument("--metrics-port", type=int, help="serve this process's metrics on this port")
    plan.add_argument("--model", help="model preset or a checkpoint folder")
    scheduler.add_argument("--model", help="the model's name, as clients use it")
    assert set(collisions(parser)) == {"GLM_METRICS_PORT", "GLM_MODEL"}


def test_a_flag_with_its_own_variable():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Probe(PoolOptions):
        """A pool with one more flag, whose variable has its own name."""

        extra: int = option(0, type=int, env="GLM_PROBE_EXTRA", help="a probe")

    parser = argparse.ArgumentParser()
    Probe.add_flags(parser)
    apply_env_defaults(parser, {"GLM_PROBE_EXTRA": "5", "GLM_EXTRA": "6", "GLM_POOL_METRICS_PORT": "9100"})
    args = parser.parse_args(["--checkpoint", "c", "--tp", "2", "--socket-dir", "/s"])
    assert (args.extra, args.metrics_port) == (5, 9100)


# ---- validation names the flag ----

@pytest.mark.parametrize("cls,settings,needle", [
    (WorkerOptions, {"rank": 2}, "--rank 2 is outside --tp 2"),
    (WorkerOptions, {"kv_memory_gib": 0.0}, "--kv-memory-gib"),
    (WorkerOptions, {"layer_trace_ratio": 1.5}, "--layer-trace-ratio"),
    (PoolOptions, {"metrics_port": 65535}, "--metrics-port 65535"),
    (SchedulerOptions, {"workers": ()}, "--workers"),
    (GatewayOptions, {"tls_cert": "c"}, "--tls-cert and --tls-key"),
    (GatewayOptions, {"default_max_new_tokens": 4096}, "--default-max-new-tokens 4096"),
    (ServeOptions, {"quant": "int2"}, "--quant 'int2'"),
])
def test_validation_names_the_flag(cls, settings, needle):
    base = {WorkerOptions: dict(checkpoint="c", tp=2, rank=0, listen="l", dist_init="d"),
            PoolOptions: dict(checkpoint="c", tp=2, socket_dir="/s"),
            SchedulerOptions: dict(model="m", checkpoint="c", workers=("w",)),
            GatewayOptions: dict(models=(("m", "c"),)),
            ServeOptions: {}}[cls]
    with pytest.raises(ValueError, match=re.escape(needle)):
        cls.from_flat(**(base | settings))


def test_scheduler_limits_default_to_the_model():
    options = SchedulerOptions(model="m", checkpoint="c", workers=("w",))
    limits = options.loop_options(2048).limits
    assert (limits.max_total_tokens, limits.max_input_tokens) == (2048, 1024)
    with pytest.raises(ValueError, match="--max-total-tokens 4096 exceeds"):
        dataclasses.replace(options, max_total_tokens=4096).loop_options(2048)


def test_composed_options_are_declared_once():
    assert compose(RankOptions).metadata["compose"] is RankOptions
    rank_flags = {f.name for f in leaves(RankOptions)}
    for cls in (WorkerOptions, PoolOptions, ServeOptions):
        assert rank_flags <= {f.name for f in leaves(cls)}
        declared_here = {f.name for f in dataclasses.fields(cls) if flag_of(f)} - {
            f.name for f in dataclasses.fields(RankOptions)}
        assert not declared_here & rank_flags, f"{cls.__name__} re-declares a rank setting"


def test_children_inherit_no_glm_variable():
    env = child_environ({"GLM_TOKENIZER": "/t", "GLM_DEBUG": "1", "PATH": "/bin", "GLM_POOL_METRICS_PORT": "1"})
    assert env == {"GLM_DEBUG": "1", "PATH": "/bin"}


def test_a_running_stack_passes_serve_flags_to_its_children(checkpoint, tmp_path):
    """Real processes: the scheduler and gateway of a running stack were given
    ``--tokenizer`` (a copy elsewhere, so the one beside the checkpoint is not what works);
    ``--port 0`` is a free port the stack chose and serves on."""
    folder = checkpoint("glm-tiny", tp=1, seed=3)
    tokenizer = tmp_path / "tok" / "ice_text.model"
    tokenizer.parent.mkdir()
    shutil.copy(Path(folder) / "ice_text.model", tokenizer)
    args = parse(["serve", "--checkpoint", folder, "--model-name", f"opt-{uuid.uuid4().hex[:6]}",
                  "--port", "0", "--tokenizer", str(tokenizer), "--max-batch-size", "3"])
    stack = LocalStack(dataclasses.replace(ServeOptions.from_args(args), workdir=str(tmp_path)))
    try:
        stack.start(ready_timeout_s=120)
        assert stack.options.port > 0 and stack.address.endswith(f":{stack.options.port}")
        for proc in [stack.gateway, *stack.schedulers]:
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
            assert argv[argv.index("--tokenizer") + 1] == str(tokenizer), argv
        scheduler = Path(f"/proc/{stack.schedulers[0].pid}/cmdline").read_bytes().decode().split("\0")
        assert scheduler[scheduler.index("--max-batch-size") + 1] == "3"
    finally:
        stack.stop()


def test_the_scheduler_reads_the_shard_token_file_for_tcp_ranks(tmp_path):
    from services.worker.client import write_token
    token = write_token(tmp_path / "shard-token")
    options = SchedulerOptions(model="m", checkpoint="c", workers=("127.0.0.1:1",),
                               shard_token_file=str(tmp_path / "shard-token"))
    assert options.loop_options(512).shard_token == token
    assert SchedulerOptions(model="m", checkpoint="c", workers=("w",)).loop_options(512).shard_token is None
    missing = SchedulerOptions(model="m", checkpoint="c", workers=("w",), shard_token_file=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="--shard-token-file"):
        missing.loop_options(512)
