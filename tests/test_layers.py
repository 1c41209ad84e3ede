"""The floors of the code, read from the import statements: the core never imports torch,
transformers, grpc or the layers above it; the model layer never imports the service or the
client; nothing in the library (`pixelprune/`, every subpackage) imports the service or the
client package; no module imports back from the `pixelprune` dispatcher (pixelprune.cli); and
nothing in the library imports in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (ROOT / "pixelprune").glob("*.py"))
MODEL = sorted((ROOT / "pixelprune" / "model").glob("*.py"))
LIBRARY = sorted((ROOT / "pixelprune").rglob("*.py"))
PACKAGES = sorted(p for folder in ("pixelprune", "service", "agent_client") for p in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (deferred ones included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_imports_no_model_layer_and_no_heavy_library(path):
    forbidden = {"torch", "transformers", "grpc", "grpc_health", "grpc_reflection", "google", "service",
                 "agent_client", "pixelprune_api", "redis", "prometheus_client"}
    bad = sorted(name for name in imports_of(path)
                 if top(name) in forbidden or name.startswith("pixelprune.model"))
    assert not bad, f"{path.name} (core) imports {bad}"


@pytest.mark.parametrize("path", MODEL, ids=lambda p: p.name)
def test_model_layer_imports_no_service_or_client(path):
    bad = sorted(name for name in imports_of(path) if top(name) in {"service", "agent_client", "grpc"})
    assert not bad, f"pixelprune/model/{path.name} imports {bad}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT / "pixelprune")))
def test_the_library_imports_neither_the_service_nor_the_client(path):
    """`pixelprune eval --target` speaks the contract's stubs (pixelprune_api), not agent_client."""
    bad = sorted(name for name in imports_of(path) if top(name) in {"service", "agent_client"})
    assert not bad, f"pixelprune/{path.relative_to(ROOT / 'pixelprune')} imports {bad}"


@pytest.mark.parametrize("path", PACKAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_back_from_the_dispatcher(path):
    """pixelprune.cli imports the subcommands (serve, eval, ...); they take what they share from
    pixelprune.cli_common, below all of them."""
    assert "pixelprune.cli" not in imports_of(path), f"{path.relative_to(ROOT)} imports pixelprune.cli"


def test_the_rules_see_the_files_that_broke_them():
    """The scans above cover the modules that once imported upward, and would see it again."""
    assert ROOT / "pixelprune" / "eval" / "runners.py" in LIBRARY
    assert {ROOT / "service" / "cli.py", ROOT / "pixelprune" / "eval" / "command.py"} <= set(PACKAGES)


def test_no_import_cycle_in_the_library():
    graph = {}
    for path in LIBRARY:
        graph[module_name(path)] = {name for name in imports_of(path) if name.startswith("pixelprune.")}
    # a package's __init__ that only re-exports lazily does not count as importing its modules
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
            if state.get(nxt) is None and nxt in graph:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_importing_the_core_loads_no_torch():
    core = [module_name(p) for p in CORE if p.name not in ("cli.py", "__main__.py")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in core) + \
        "print(sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
