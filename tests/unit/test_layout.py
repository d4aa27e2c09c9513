"""The layout of DESIGN.md section 4, checked on the source: dependencies run one way, and every module says what it
owns.

raffm (the core, with the contract's stubs in raffm.v1) imports none of the others; edge_agent imports only the core;
each service imports the core, services.common and itself, never another service; services.common imports no
service; raffm_app, at the top, may import everything, and nothing below imports it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("raffm", "raffm_app", "services", "edge_agent")
SERVICES = ("registry", "extractor", "aggregator")


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _component(module: str) -> str | None:
    """``raffm``, ``raffm_app``, ``edge_agent``, ``services.common`` or ``services.<name>``; None: not ours."""
    parts = module.split(".")
    if parts[0] == "services":
        return ".".join(parts[:2]) if len(parts) > 1 else "services"
    return parts[0] if parts[0] in PACKAGES else None


def _allowed(component: str) -> set[str]:
    if component == "raffm_app":
        return {"raffm", "raffm_app", "edge_agent", "services", "services.common",
                *(f"services.{s}" for s in SERVICES)}
    if component in ("raffm", "edge_agent"):
        return {"raffm", component}
    if component in ("services", "services.common"):
        return {"raffm", "services", "services.common"}
    return {"raffm", "services", "services.common", component}  # one service: itself, the chassis, the core


_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _imports(tree: ast.AST) -> set[str]:
    """Modules imported anywhere (function-level imports too), and strings naming a module of ours: what
    ``importlib.import_module`` or ``python -m`` would load."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.match(node.value):
            top = node.value.split(".")[0]
            if top in PACKAGES and ("." in node.value or top in ("edge_agent", "raffm_app")):
                names.add(node.value)
    return names


def _own_component(path: Path) -> str:
    component = _component(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert component is not None
    return component


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_dependencies_run_one_way(path: Path) -> None:
    component = _own_component(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    used = {c for c in map(_component, _imports(tree)) if c is not None}
    assert used <= _allowed(component), f"{component} imports {sorted(used - _allowed(component))}"


@pytest.mark.parametrize("path", [p for p in _modules() if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_owns(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no module docstring"


def test_the_rules_catch_a_cross_service_import() -> None:
    for source in ("def f():\n    from services.extractor.slices import SliceService\n",
                   "MODULES = ('services.extractor.cli',)\n"):
        used = {c for c in map(_component, _imports(ast.parse(source))) if c is not None}
        assert not used <= _allowed("services.aggregator"), source
    assert not {"services.registry"} <= _allowed("raffm") and not {"raffm_app"} <= _allowed("edge_agent")
