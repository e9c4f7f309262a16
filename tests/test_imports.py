"""Import structure: no cycles between our modules, and light modules stay light."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sweeps", "trainers", "search_spaces")


def _module_files() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> our modules it imports, counting every import statement: top-level, inside
    functions (deferred imports still form a cycle, only a later one) and under TYPE_CHECKING."""
    mods = _module_files()
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # from pkg import module
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_our_modules() -> None:
    graph = import_graph()
    assert "sweeps.driver" in graph["sweeps.cli"], "the graph misses imports made inside functions"
    assert _cycles(graph) == []


def test_each_factory_name_is_defined_in_one_module() -> None:
    """A public ``make_*`` names one thing across our packages: ``make_scheduler`` once named both the
    Tune trial scheduler (sweeps/schedulers.py) and diffusers' sampling scheduler
    (trainers/evaluate.py, now ``make_sampling_scheduler``); Optuna's sampler is ``make_sampler``."""
    where: dict[str, list[str]] = {}
    for name, f in _module_files().items():
        for node in ast.parse(f.read_text(), str(f)).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("make_"):
                where.setdefault(node.name, []).append(name)
    assert {n: m for n, m in where.items() if len(m) > 1} == {}
    assert {"make_scheduler", "make_sampler", "make_sampling_scheduler"} <= set(where)


def test_reading_results_does_not_import_the_trial_worker_or_ray() -> None:
    code = ("import sys, sweeps.results, sweeps.cli; "
            "print(sorted(m for m in ('sweeps.trial', 'sweeps.driver', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _trainers_modules() -> list[str]:
    return sorted(m for m in _module_files() if m.startswith("trainers") and not m.endswith("__main__"))


def test_importing_any_trainers_module_prints_no_library_notice() -> None:
    """transformers without torchvision logs a CLIPImageProcessor / SiglipImageProcessor fallback notice
    when diffusers' pipelines look the names up; trainers/__init__.py drops exactly that notice."""
    modules = _trainers_modules()
    assert "trainers.lora" in modules and "trainers.toyworld" in modules
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "DIFFUSERS_"))}
    out = subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == "", out.stderr[-3000:]


def test_the_notice_filter_drops_only_the_torchvision_fallback_and_only_at_default_verbosity() -> None:
    code = """import logging, trainers
from transformers.utils import logging as hf_logging
log = logging.getLogger("transformers.utils.import_utils")
log.warning("`FooImageProcessor` requires torchvision (not installed); falling back to `FooImageProcessorPil` for "
            "backward compatibility. Install torchvision to use the default backend")
log.warning("something else entirely")
hf_logging.set_verbosity_info()
log.warning("`BarImageProcessor` requires torchvision (not installed); falling back to `BarImageProcessorPil` for "
            "backward compatibility.")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "FooImageProcessor" not in out.stderr  # the known notice, at transformers' default verbosity
    assert "something else entirely" in out.stderr  # any other warning still shows
    assert "BarImageProcessor" in out.stderr  # TRANSFORMERS_VERBOSITY=info (here: set_verbosity_info) shows it


def test_cli_and_results_readers_import_no_heavy_library() -> None:
    """`sdsweep results/report/--help` import only these (the commands themselves: tests/test_report.py)."""
    code = ("import sys, sweeps.cli, sweeps.results, sweeps.report, sweeps.board, sweeps.tune_state; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers', 'diffusers', 'wandb', 'optuna', 'pydantic') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
