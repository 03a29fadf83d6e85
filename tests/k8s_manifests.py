"""Rendering and reading the Kubernetes manifests for tests/test_k8s.py: ``kubectl
kustomize`` output per target, its documents, containers, environment and the ``glm``
command lines they run -- with, for ``glm pool``, the ``glm worker`` line of each rank it
launches -- parsed with the real CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from services.cli.main import build_parser
from services.common.env import apply_env_defaults, variable
from services.worker.options import PoolOptions

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.30.0"
OVERLAYS = {  # overlay -> (tp, GLM_QUANT)
    "int4-tp4": (4, "int4"),
    "int8-tp8": (8, "int8"),
    "fp16-tp8": (8, "none"),
}
TARGETS = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
OUR_IMAGES = ("glm-serve-cpu", "glm-serve-cuda")

KUBECTL = shutil.which("kubectl")



@lru_cache(maxsize=None)
def _rendered(target: str) -> tuple[dict, ...]:
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def _docs(target: str, kind: str | None = None) -> list[dict]:
    return [d for d in _rendered(target) if kind is None or d["kind"] == kind]


def _one(target: str, kind: str, name: str) -> dict:
    found = [d for d in _docs(target, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"k8s/{target}: expected one {kind} {name}, found {len(found)}"
    return found[0]


def _configmap(target: str, name: str) -> dict[str, str]:
    """Data of a ConfigMap by its rendered name (generated names carry a hash suffix)."""
    return next(d for d in _docs(target, "ConfigMap") if d["metadata"]["name"] == name).get("data", {})


def _workloads(target: str) -> list[dict]:
    return [d for d in _rendered(target) if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _container(target: str, deployment: str, name: str) -> dict:
    pod = _one(target, "Deployment", deployment)["spec"]["template"]["spec"]
    return next(c for c in _containers(pod) if c["name"] == name)


def _env(target: str, container: dict) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        env.update(_configmap(target, source["configMapRef"]["name"]))
    for var in container.get("env", []):
        assert "value" in var, f"{container['name']}: env {var['name']} must be a plain value here"
        env[var["name"]] = var["value"]
    return env


def _mounted_file(target: str, pod: dict, container: dict, path: str) -> str | None:
    """The text of ``path`` when it lies in a ConfigMap volume mounted in ``container``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        volume = volumes[mount["name"]]
        if path.startswith(prefix) and "configMap" in volume:
            return _configmap(target, volume["configMap"]["name"]).get(path[len(prefix):])
    return None


def _glm_invocations(target: str, pod: dict, container: dict) -> list[list[str]]:
    """The ``glm`` argv a container runs (its command + args), or none."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    return [argv] if argv and argv[0] == "glm" else []


def _rank_invocations(pool_args: argparse.Namespace) -> list[list[str]]:
    """The ``glm worker`` argv of every rank a parsed ``glm pool`` launches, as it launches them."""
    return [["glm", *worker.argv()] for worker in PoolOptions.from_args(pool_args).workers()]


def _inherited(env: dict[str, str], command: str) -> dict[str, str]:
    """What ``glm <command>`` reads of an environment it inherits: its own ``GLM_*`` variables
    (it ignores the others, e.g. a ``glm pool``'s GLM_SOCKET_DIR seen by its ranks)."""
    variables = {variable(a) for a in _subparser(command)._actions if a.option_strings}
    return {k: v for k, v in env.items() if not k.startswith("GLM_") or k in variables}


def _subparser(command: str) -> argparse.ArgumentParser:
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert command in subs.choices, f"`glm {command}` is not a subcommand of the CLI ({sorted(subs.choices)})"
    return subs.choices[command]


def _parse(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    """Parse ``glm`` argv exactly as ``glm`` would in that environment; fail with its message."""
    assert len(argv) >= 2, f"{argv}: no subcommand"
    sub = _subparser(argv[1])
    flags = {s: variable(a) for a in sub._actions for s in a.option_strings}
    variables = {variable(a) for a in sub._actions if a.option_strings and a.dest != "help"}
    for word in argv[2:]:
        if word.startswith("--"):
            assert word.split("=")[0] in flags, f"`glm {argv[1]}` has no flag {word}"
    unknown = sorted(k for k in env if k.startswith("GLM_") and k not in variables)
    assert not unknown, f"`glm {argv[1]}` has no flag for {unknown}"
    parser = build_parser()
    apply_env_defaults(parser, environ=env)  # ValueError names a bad value
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"glm {' '.join(argv[1:])} (env {sorted(env)}) does not parse: {err.getvalue()}")


# ---- rendering and schemas ----
