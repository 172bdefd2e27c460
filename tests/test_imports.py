"""Every import of the package, read from the source (inside functions too), held against DESIGN.md:

    benchmarks -> quantization -> export -> runtime -> hardware      (an arrow may skip layers)

- runtime/ and hardware/ import neither torch nor the ONNX export tools (onnx, onnxscript);
- inside runtime/, the engine imports neither the control side (control/ and the bridge) nor hardware/;
  the control side reaches the engine only through runtime/molmoact_policy.py;
- nothing outside cli/ imports a module or a name defined in cli/ (the package root
  molmoact_edge/__init__.py is cli/__init__.py);
- no two modules import each other, directly or around a longer loop.

The rules are a small function of a module set, so they are also tested on synthetic modules below. A
runtime check keeps what parsing cannot see: importing the robot modules loads no torch and no device
SDK (those load lazily, inside their adapters, when a device is opened).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = "molmoact_edge"
REPO = Path(__file__).resolve().parents[1]

# Lower number = lower layer; a module may import its own layer or any lower one (cli sits on top).
LAYERS = {"hardware": 0, "runtime": 1, "export": 2, "quantization": 3, "benchmarks": 4, "cli": 5}
TORCH_SIDE = ("torch", "onnx", "onnxscript")  # what the robot side must never need
ENGINE = f"{ROOT}.runtime.engine"
CONTROL = f"{ROOT}.runtime.control"
BRIDGE = f"{ROOT}.runtime.molmoact_policy"
# Calls that import a module named by their first (literal) argument: the stdlib's and the
# project's own `require(module, distribution)` helpers, which exist to load SDKs lazily.
IMPORT_CALLS = {"import_module", "__import__", "require"}


@dataclass(frozen=True)
class Import:
    target: str  # the module that gets loaded (a module of the package, or an external top-level name)
    line: int
    name: str | None = None  # for `from M import name` where name is not itself a module
    type_only: bool = False  # under `if TYPE_CHECKING:`: a dependency, but never executed


@dataclass
class Module:
    name: str
    path: str  # as shown in messages, relative to the repository
    is_package: bool
    imports: list[Import] = field(default_factory=list)


# ------------------------------------------------------------------ reading the package


def package_dirs(repo: Path = REPO) -> dict[str, Path]:
    """pyproject's setuptools package-dir: import package -> folder."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    dirs = meta["tool"]["setuptools"]["package-dir"]
    return {pkg: repo / folder for pkg, folder in dirs.items()}


def discover(repo: Path = REPO) -> dict[str, tuple[str, bool, str]]:
    """Every module of the package: name -> (path shown, is_package, source)."""
    dirs = package_dirs(repo)
    found: dict[str, tuple[str, bool, str]] = {}
    for pkg, folder in dirs.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("").parts
            # A subfolder that package-dir maps on its own is read under that entry, not twice.
            if rel and any(f"{pkg}.{'.'.join(rel[:i])}" in dirs for i in range(1, len(rel))):
                continue
            is_pkg = rel[-1] == "__init__"
            name = ".".join((pkg, *rel[:-1]) if is_pkg else (pkg, *rel))
            found[name] = (str(f.relative_to(repo)), is_pkg, f.read_text())
    return found


def _absolute(module: Module, level: int, base: str | None) -> str:
    """The absolute module of a relative `from` import."""
    parts = module.name.split(".")
    keep = len(parts) - level + (1 if module.is_package else 0)
    if keep <= 0:
        raise ValueError(f"{module.path}: relative import goes above the package root")
    return ".".join(parts[:keep] + ([base] if base else []))


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def parse_modules(sources: dict[str, tuple[str, bool, str]]) -> dict[str, Module]:
    """Read each module's imports (any depth: module level, functions, methods, conditionals)."""
    modules = {name: Module(name, path, is_pkg) for name, (path, is_pkg, _) in sources.items()}
    for name, (path, _, text) in sources.items():
        mod = modules[name]
        tree = ast.parse(text, filename=path)
        type_only = _type_checking_lines(tree)
        for node in ast.walk(tree):
            tc = getattr(node, "lineno", 0) in type_only
            if isinstance(node, ast.Import):
                mod.imports += [Import(a.name, node.lineno, type_only=tc) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(mod, node.level, node.module) if node.level else node.module
                if base == "__future__":
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:  # `from package import submodule`
                        mod.imports.append(Import(sub, node.lineno, type_only=tc))
                    else:
                        mod.imports.append(Import(base, node.lineno, None if a.name == "*" else a.name, tc))
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if called in IMPORT_CALLS:
                    mod.imports.append(Import(node.args[0].value, node.lineno, type_only=tc))
    return modules


# ------------------------------------------------------------------ the rules


def layer_of(module: str) -> str | None:
    """The DESIGN.md layer of a package module (None for anything outside the package)."""
    parts = module.split(".")
    if parts[0] != ROOT:
        return None
    if len(parts) > 1 and parts[1] in LAYERS and parts[1] != "cli":
        return parts[1]
    return "cli"  # the package root and every molmoact_edge.<x> that is not a mapped folder


def _room(module: str) -> str | None:
    if module == ENGINE or module.startswith(ENGINE + "."):
        return "engine"
    if module == CONTROL or module.startswith(CONTROL + ".") or module == BRIDGE:
        return "bridge" if module == BRIDGE else "control"
    return None


def check_rules(modules: dict[str, Module]) -> list[str]:
    """Each broken arrow as 'path:line: [rule] what; the fix'."""
    errors: list[str] = []
    for mod in modules.values():
        src_layer = layer_of(mod.name)
        for imp in mod.imports:
            where = f"{mod.path}:{imp.line}"
            what = imp.target + (f".{imp.name}" if imp.name else "")
            top = imp.target.split(".")[0]
            if top != ROOT:
                if src_layer in ("runtime", "hardware") and top in TORCH_SIDE:
                    errors.append(f"{where}: [no-torch] {src_layer}/ imports {imp.target}; the robot install has "
                                  f"no torch or ONNX tools: move this to export/")
                continue
            dst_layer = layer_of(imp.target)
            if dst_layer == "cli" and src_layer != "cli":
                errors.append(f"{where}: [cli-on-top] {src_layer}/ imports {what} from the CLI; nothing outside "
                              f"cli/ may: move it into the library layer that owns it")
                continue
            if LAYERS[dst_layer] > LAYERS[src_layer]:
                errors.append(f"{where}: [layers] {src_layer}/ imports {what}, but {dst_layer} sits above "
                              f"{src_layer} (benchmarks -> quantization -> export -> runtime -> hardware)")
                continue
            src_room, dst_room = _room(mod.name), _room(imp.target)
            if src_room == "engine" and (dst_room in ("control", "bridge") or dst_layer == "hardware"):
                errors.append(f"{where}: [engine-alone] the engine imports {what}; the engine needs no device "
                              f"and no control loop: keep that code on the control side")
            elif src_room == "control" and dst_room == "engine":
                errors.append(f"{where}: [one-bridge] control/ imports {what}; the control side reaches the "
                              f"engine only through {BRIDGE}")
    return errors


def find_cycles(modules: dict[str, Module]) -> list[str]:
    """Each import cycle between package modules (function-level imports count: they run on first call),
    as 'a (path:line) -> b (path:line) -> a'. One report per strongly connected set."""
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod in modules.values():
        for imp in mod.imports:
            if imp.target in modules and imp.target != mod.name and not imp.type_only:
                edges[mod.name].setdefault(imp.target, imp.line)

    # Tarjan's strongly connected components, iteratively (no recursion limit to worry about).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    scc.append(w)
                    if w == node:
                        break
                if len(scc) > 1:
                    sccs.append(sorted(scc))

    reports = []
    for scc in sccs:
        members = set(scc)
        first = scc[0]
        # Shortest loop from the first member back to itself, inside the component.
        prev: dict[str, str] = {}
        frontier, seen, found = [first], {first}, None
        while frontier and found is None:
            nxt = []
            for n in frontier:
                for c in sorted(edges[n]):
                    if c == first:
                        found = n
                        break
                    if c in members and c not in seen:
                        seen.add(c)
                        prev[c] = n
                        nxt.append(c)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != first:
            path.append(prev[path[-1]])
        path.reverse()
        hops = [f"{a} ({modules[a].path}:{edges[a][b]})" for a, b in zip(path, path[1:] + [first])]
        reports.append(f"[no-cycle] import cycle: {' -> '.join(hops)} -> {first}; move what they share "
                       f"into a module below them" + (f" (all of {', '.join(scc)} are tangled)" if len(scc) > len(path) else ""))
    return reports


def check(modules: dict[str, Module]) -> list[str]:
    return check_rules(modules) + find_cycles(modules)


# ------------------------------------------------------------------ the package itself


def test_every_module_keeps_the_dependency_rules():
    sources = discover()
    # The walk really sees the package: every mapped folder and both rooms of runtime/.
    for must in (ROOT, f"{ROOT}.main", f"{ROOT}.export", f"{ROOT}.hardware", f"{ROOT}.benchmarks", BRIDGE,
                 f"{ENGINE}.pipeline", f"{CONTROL}.loop"):
        assert must in sources, f"{must} not found: is pyproject's package-dir still read right?"
    errors = check(parse_modules(sources))
    assert not errors, "import rules of DESIGN.md broken:\n" + "\n".join(errors)


ROBOT_SDKS = ("franky", "pyrealsense2", "franky_sim", "mujoco")


def test_robot_modules_load_neither_torch_nor_device_sdks():
    """What parsing cannot see: a module-level import hidden behind a helper would load an SDK at startup."""
    robot = sorted(n for n in discover() if layer_of(n) in ("runtime", "hardware"))
    robot += [f"{ROOT}.run_cmd", f"{ROOT}.record_cmd"]
    code = (
        "import importlib, sys\n"
        f"for m in {robot!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxscript')"
        f" or m.startswith(('{ROOT}.export', '{ROOT}.quantization'))]\n"
        f"bad += [m for m in {ROBOT_SDKS!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"loaded at module import: {out.stdout.strip()}"


# ------------------------------------------------------------------ the rules on synthetic module sets


def synthetic(**files: str) -> dict[str, Module]:
    """Modules from 'folder/sub/file' -> source, with folders mapped like pyproject (cli -> package root)."""
    sources = {}
    for key, text in files.items():
        parts = key.split("__")  # keyword names cannot hold '/': runtime__engine__x is runtime/engine/x.py
        is_pkg = parts[-1] == "init"
        folder = [] if parts[0] == "cli" else [parts[0]]
        rest = parts[1:-1] if is_pkg else parts[1:]
        name = ".".join([ROOT, *folder, *rest])
        sources[name] = ("/".join(parts[:-1] + ["__init__" if is_pkg else parts[-1]]) + ".py", is_pkg, text)
    return parse_modules(sources)


BASE = dict(
    cli__init="",
    cli__main="from molmoact_edge.runtime.engine import grammar\nfrom molmoact_edge import demo_cmd\n",
    cli__demo_cmd="import torch\nfrom molmoact_edge.export.model import Model\n",
    runtime__init="",
    runtime__engine__init="",
    runtime__engine__grammar="import numpy as np\nfrom . import parser\n",
    runtime__engine__parser="def f():\n    import onnxruntime\n",
    runtime__control__init="",
    runtime__control__loop="from molmoact_edge.hardware.arm import Arm\nfrom ..molmoact_policy import P\n",
    runtime__molmoact_policy="from molmoact_edge.runtime.engine.grammar import G\n",
    hardware__init="",
    hardware__arm="def arm():\n    return require('franky', 'franky-control')\n",
    export__init="",
    export__model="import torch\nfrom molmoact_edge.runtime.engine.parser import parse\n",
    benchmarks__init="",
    benchmarks__bench="from molmoact_edge.export.model import Model\nfrom molmoact_edge import runtime\n",
)


def errors_with(**changes: str) -> list[str]:
    return check(synthetic(**{**BASE, **changes}))


def test_checker_accepts_a_clean_set():
    assert errors_with() == []


def test_checker_resolves_relative_imports():
    mods = synthetic(**BASE)
    assert [i.target for i in mods[f"{ENGINE}.grammar"].imports] == ["numpy", f"{ENGINE}.parser"]
    assert mods[f"{CONTROL}.loop"].imports[1] == Import(BRIDGE, 2, "P")


def test_checker_finds_a_cycle_hidden_in_a_function():
    errs = errors_with(runtime__engine__parser="def f():\n    from molmoact_edge.runtime.engine.grammar import G\n")
    assert errs == [f"[no-cycle] import cycle: {ENGINE}.grammar (runtime/engine/grammar.py:2) -> {ENGINE}.parser "
                    f"(runtime/engine/parser.py:2) -> {ENGINE}.grammar; move what they share into a module "
                    f"below them"]


def test_checker_finds_a_longer_cycle_and_ignores_type_only_imports():
    errs = errors_with(runtime__engine__parser="from . import actions\n",
                       runtime__engine__actions="def f():\n    from .grammar import G\n")
    assert errs == [f"[no-cycle] import cycle: {ENGINE}.actions (runtime/engine/actions.py:2) -> {ENGINE}.grammar "
                    f"(runtime/engine/grammar.py:2) -> {ENGINE}.parser (runtime/engine/parser.py:1) -> "
                    f"{ENGINE}.actions; move what they share into a module below them"]
    typed = errors_with(runtime__engine__parser="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                "    from molmoact_edge.runtime.engine.grammar import G\n")
    assert typed == []


def test_checker_finds_a_wrong_arrow():
    errs = errors_with(hardware__arm="def f():\n    from molmoact_edge.runtime.engine.parser import parse\n")
    assert errs == ["hardware/arm.py:2: [layers] hardware/ imports molmoact_edge.runtime.engine.parser.parse, but "
                    "runtime sits above hardware (benchmarks -> quantization -> export -> runtime -> hardware)"]
    assert any("[layers] runtime/ imports molmoact_edge.export" in e
               for e in errors_with(runtime__engine__parser="from molmoact_edge.export import model\n"))


def test_checker_keeps_torch_off_the_robot_side():
    for side, key in (("runtime", "runtime__engine__parser"), ("hardware", "hardware__arm")):
        for how in ("def f():\n    import torch.nn\n", "import onnx\n", "from onnxscript import script\n",
                    "x = require('torch', 'torch')\n"):
            errs = errors_with(**{key: how})
            assert len(errs) == 1 and f"[no-torch] {side}/ imports" in errs[0], (how, errs)


def test_checker_keeps_the_engine_alone_and_control_behind_the_bridge():
    assert "[engine-alone]" in errors_with(runtime__engine__parser="from molmoact_edge.hardware import arm\n")[0]
    assert "[engine-alone]" in errors_with(runtime__engine__parser="from ..control.loop import L\n")[0]
    assert "[engine-alone]" in errors_with(runtime__engine__parser="import molmoact_edge.runtime.molmoact_policy\n")[0]
    assert "[one-bridge]" in errors_with(runtime__control__loop="from ..engine.parser import parse\n")[0]


def test_checker_keeps_the_cli_on_top():
    # A CLI module, and a name defined in the package root (cli/__init__.py), are both the CLI.
    for how in ("from molmoact_edge.demo_cmd import scene\n", "from molmoact_edge import __version__\n",
                "import molmoact_edge\n", "from molmoact_edge import demo_cmd\n"):
        errs = errors_with(benchmarks__bench=how)
        assert len(errs) == 1 and "[cli-on-top] benchmarks/ imports" in errs[0], (how, errs)
    # A subpackage reached through the root is not the CLI (BASE's benchmark does this).
    assert errors_with() == []
