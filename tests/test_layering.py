"""The import rules of ``docs/architecture.md`` "Layering", checked on the source: model/ stays free of service
libraries, gateway and scheduler stay free of torch, and the top-level names
``model`` and ``kernels`` resolve inside this repository."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE_LIBS = {"grpc", "redis", "google", "opentelemetry", "services"}
HEAVY = {"torch", "model", "kernels", "numpy", "cupy"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def sources(*parts: str) -> list[Path]:
    base = ROOT.joinpath(*parts)
    return sorted(p for p in base.rglob("*.py") if "_pb2" not in p.name) if base.exists() else []


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_never_imports_service_libraries(path):
    assert not imported_roots(path) & SERVICE_LIBS


@pytest.mark.parametrize("path", sources("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_no_model_or_service_code(path):
    assert not imported_roots(path) & (SERVICE_LIBS | {"model", "sentencepiece"})


# The prompt rules and the tokenizer are pure Python over sentencepiece; gateway and
# scheduler need them (validation, stop texts, blank splicing). These three modules are
# the only part of ``model`` they may import, and they must stay torch-free.
TORCH_FREE_MODEL_MODULES = {"model.config", "model.kv_footprint", "model.limits", "model.prompt", "model.tokenizer"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


LIGHT_SERVICES = sources("services", "gateway") + sources("services", "scheduler") + sources("services", "common")


@pytest.mark.parametrize("path", LIGHT_SERVICES, ids=lambda p: str(p.relative_to(ROOT)))
def test_gateway_and_scheduler_never_import_torch(path):
    heavy = {m for m in imported_modules(path) if m.split(".")[0] in HEAVY}
    assert heavy <= TORCH_FREE_MODEL_MODULES, heavy - TORCH_FREE_MODEL_MODULES


@pytest.mark.parametrize("name", sorted(TORCH_FREE_MODEL_MODULES))
def test_shared_model_modules_stay_torch_free(name):
    path = ROOT / (name.replace(".", "/") + ".py")
    assert not imported_roots(path) & {"torch", "kernels", "numpy"}
    inner = {m for m in imported_modules(path) if m.startswith("model")}
    assert inner <= TORCH_FREE_MODEL_MODULES | {"model"}


@pytest.mark.processes                 # a fresh interpreter
def test_light_service_packages_load_without_torch():
    import subprocess
    import sys

    packages = [p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") for p in LIGHT_SERVICES]
    code = ("import importlib, sys\n"
            f"for name in {packages!r}:\n"
            "    importlib.import_module(name.removesuffix('.__init__'))\n"
            "print(sorted(m for m in ('torch', 'kernels', 'model.glm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_model_never_reads_the_environment(path):
    text = path.read_text()
    assert "os.environ" not in text and "getenv" not in text


def test_only_one_module_reads_the_environment():
    readers = [p for p in sources("services") + sources("model") + sources("kernels")
               if "os.environ" in p.read_text() or "getenv(" in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in readers] == ["services/common/env.py"]


@pytest.mark.parametrize("name", ["model", "kernels", "services"])
def test_top_level_packages_resolve_inside_the_repository(name):
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().is_relative_to(ROOT)


@pytest.mark.processes                 # a fresh interpreter
def test_cli_parser_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from services.cli.main import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
