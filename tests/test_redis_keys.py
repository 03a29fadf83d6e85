"""The Redis key layout (``services/common/redis_keys.py``, docs/architecture.md "Redis
contract"): parts are escaped so no value spells another key, request ids are namespaced
by tenant, and no other module writes a key by hand. Pure: no Redis."""

from __future__ import annotations

import ast
import re
from itertools import product
from pathlib import Path
from urllib.parse import unquote

import pytest

from services.common import redis_keys as keys
from services.gateway.auth import TENANT_HEX, tenant_of

ROOT = Path(__file__).resolve().parents[1]
NASTY = ["V", "V:cancel", "V:events", "x", "x:events", "x:events:cancel", "%", "%25", "%3A", "a%3Ab",
         "a:b", "a/b", "/", "anonymous/V", "glm:req:V", "*", "V*", "[ab]", "?", "\\", "é", "e\u0301",
         "名字", "🙂", " ", "\t", "\n", "", "y" * 128, "-", ".", "_"]
TENANTS = [keys.ANONYMOUS, tenant_of("key-a"), tenant_of("key-b")]
KINDS = (keys.request, keys.events, keys.cancel)


def test_a_part_never_holds_a_separator_and_reads_back():
    for text in NASTY:
        escaped = keys.part(text)
        assert re.fullmatch(r"(?:[A-Za-z0-9._-]|%[0-9A-F]{2})*", escaped), (text, escaped)
        assert ":" not in escaped and unquote(escaped) == text
    assert len({keys.part(t) for t in NASTY}) == len(NASTY)


def test_no_two_requests_share_a_key():
    """Every key of every (tenant, id) pair is distinct from every key of every other."""
    owner: dict[str, tuple[str, str]] = {}
    for tenant, rid in product(TENANTS, NASTY):
        for kind in KINDS:
            key = kind(keys.namespaced(tenant, rid))
            assert key not in owner, (key, (tenant, rid), owner.get(key))
            owner[key] = (tenant, rid)
    for key, (tenant, rid) in owner.items():          # each key names its request back
        prefix, kind, escaped, *suffix = key.split(":")
        assert (prefix, kind) == ("glm", "req") and suffix in ([], ["events"], ["cancel"])
        assert unquote(escaped) == keys.namespaced(tenant, rid)


def test_model_and_pool_parts_are_escaped_too():
    assert keys.queue("glm-130b") == "glm:queue:glm-130b"        # plain names read as they are
    assert keys.queue("a:b") != keys.queue("a") and ":" not in keys.queue("a:b")[len("glm:queue:"):]
    assert keys.pool("host-1.pid") == "glm:pool:host-1.pid"
    assert keys.dead_letter("m*") == "glm:dead:m%2A"


def test_tenants_are_stable_digests_that_hide_the_key():
    a = tenant_of("key-a")
    assert a == tenant_of("key-a") != tenant_of("key-b")
    assert re.fullmatch(f"[0-9a-f]{{{TENANT_HEX}}}", a) and "key-a" not in a
    assert tenant_of(None) == tenant_of("") == keys.ANONYMOUS
    assert keys.caller_id(keys.namespaced(a, "x/y:z")) == "x/y:z"
    with pytest.raises(ValueError):
        keys.namespaced("a/b", "x")
    with pytest.raises(ValueError):
        keys.namespaced("", "x")


def _key_literals(path: Path) -> list[str]:
    """String literals (docstrings aside) in ``path`` that begin a Redis key by hand."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            node = node.values[0]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and node.value.startswith(keys.PREFIX):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return sorted(set(found))


def test_only_redis_keys_builds_keys():
    own = ROOT / "services" / "common" / "redis_keys.py"
    found = [hit for folder in ("services", "bench") for path in sorted((ROOT / folder).rglob("*.py"))
             if path != own and "proto_gen" not in path.parts for hit in _key_literals(path)]
    assert found == []
