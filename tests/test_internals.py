"""The registry of vLLM internals (hivtp_vllm/internals.py) agrees with the
installed vLLM and with the plugin's code.

- every symbol of every row resolves in the installed vLLM (an instance
  attribute: found as ``self.name`` or a field in the class's source);
- every vLLM name the package imports, and every private member of a vLLM
  class it overrides or calls, is named by a row;
- every runtime patch is a row and lives in hivtp_vllm/vllm_compat.py, and no
  other module of the package assigns to a vLLM object;
- docs/vllm-internals.md prints exactly the registry.

Runs on the CPU build and on each GPU build (scripts/test.sh).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from hivtp_vllm import internals, vllm_compat
from hivtp_vllm.families import FAMILIES
from hivtp_vllm.internals import INTERNALS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hivtp_vllm"
# The package's modules that run inside vLLM (the tools import no vLLM
# internals but ``vllm.LLM``, listed too).
SERVING = sorted(p for p in PACKAGE.rglob("*.py") if "tools" not in p.parts)
ALL_SYMBOLS = [s for row in INTERNALS for s in row.symbols]


def resolve(symbol: str) -> object:
    """The object a registry symbol names; AssertionError if it is gone."""
    module, _, path = symbol.partition(":")
    path, _, attribute = path.partition("#")
    obj: object = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    if attribute:
        assert isinstance(obj, type), symbol
        source = "".join(
            inspect.getsource(c)
            for c in obj.__mro__
            if c.__module__.startswith(("vllm", "transformers"))
        )
        pattern = rf"\bself\.{attribute}\b|^\s+{attribute}\s*[:=]"
        assert re.search(pattern, source, re.M), f"{symbol}: no {attribute} in its source"
    return obj


@pytest.mark.parametrize("symbol", ALL_SYMBOLS)
def test_every_symbol_is_in_the_installed_vllm(symbol):
    assert resolve(symbol) is not None


def named(module: str, name: str) -> bool:
    """Whether a row names ``module.name`` or something inside it."""
    prefixes = (f"{module}:{name}", f"{module}.{name}:")
    return any(
        s == prefixes[0] or s.startswith((prefixes[0] + ".", prefixes[0] + "#", prefixes[1]))
        for s in ALL_SYMBOLS
    )


def vllm_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every ``from vllm... import name`` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                found += [(path.name, node.module, a.name) for a in node.names]
    return found


def test_every_vllm_name_the_package_imports_is_a_row():
    imports = vllm_imports()
    assert len(imports) > 20  # the scan sees the package's imports
    missing = [f"{f}: from {m} import {n}" for f, m, n in imports if not named(m, n)]
    assert not missing, missing


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def vllm_private_names() -> set[str]:
    """Private names (``_x``, not dunders) that vLLM's classes define, over
    the MROs of every class of the package's vLLM glue that has a vLLM base."""
    names: set[str] = set()
    for path in SERVING:
        module = importlib.import_module(_module_name(path))
        for obj in vars(module).values():
            if not (isinstance(obj, type) and obj.__module__ == module.__name__):
                continue
            for base in obj.__mro__:
                if base.__module__.startswith("vllm"):
                    names |= {n for n in vars(base) if n.startswith("_") and not n.startswith("__")}
    return names


def private_vllm_members() -> set[tuple[str, str]]:
    """(file, name) of the private members of vLLM classes the package
    overrides (``def _x`` in a class) or reaches (``self._x``, ``super()._x``),
    and the private functions of Python's ``sys`` it calls."""
    vllm_names = vllm_private_names()
    found = set()
    for path in SERVING:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in vllm_names:
                found.add((path.name, node.name))
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                base = node.value
                on_self = isinstance(base, ast.Name) and base.id == "self"
                on_super = isinstance(base, ast.Call) and getattr(base.func, "id", "") == "super"
                if (on_self or on_super) and node.attr in vllm_names:
                    found.add((path.name, node.attr))
                elif isinstance(base, ast.Name) and base.id == "sys":
                    found.add((path.name, node.attr))
    return found


def test_every_private_vllm_member_the_package_touches_is_a_row():
    touched = private_vllm_members()
    assert ("processor.py", "_get_mm_hashes") in touched  # the scan sees overrides
    assert ("llava.py", "_process_image_pixels") in touched  # and calls
    ends = {re.split(r"[.#:]", s)[-1] for s in ALL_SYMBOLS}
    missing = sorted(f"{f}: {name}" for f, name in touched if name not in ends)
    assert not missing, missing


PATCHES = {
    "allow_hivtp_request_kwargs",
    "let_vllm_limit_image_size",
    "open_mrope_pruning_hook",
    "let_cpu_v1_runner_recompute_mrope",
    "remember_decode_offset",
    "capture_no_encoder_graphs",
}


def test_every_runtime_patch_is_a_row_and_lives_in_vllm_compat():
    rows = {row.patch for row in INTERNALS if row.patch}
    assert rows == {f"vllm_compat.{name}" for name in PATCHES}
    for name in PATCHES:
        assert callable(getattr(vllm_compat, name)), name
    for row in INTERNALS:
        if row.patch:
            assert "vllm_compat" in row.code, row.what


def test_no_other_module_assigns_to_a_vllm_object():
    """Outside vllm_compat no module sets an attribute of something it
    imported from vLLM (a class, a module, a function) nor calls setattr."""
    offenders = []
    for path in SERVING:
        if path.name == "vllm_compat.py":
            continue
        tree = ast.parse(path.read_text())
        from_vllm = {
            (a.asname or a.name)
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vllm")
            for a in n.names
        }
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute):
                    root = target.value
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(root, ast.Name) and root.id in from_vllm:
                        offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr":
                offenders.append(f"{path.name}:{node.lineno} setattr")
    assert not offenders, offenders


def test_the_docs_print_the_registry():
    doc = (ROOT / "docs" / "vllm-internals.md").read_text()
    table = doc.split("<!-- registry:", 1)[1].split("\n", 1)[1].split("<!-- /registry -->")[0]
    assert table == internals.render_markdown()


def test_every_row_is_complete():
    for row in INTERNALS:
        assert row.symbols and row.code and row.retire, row.what
        assert set(row.checked) == set(internals.RELEASES), row.what
        assert set(row.runners) <= {"V1", "V2"}, row.what
        for module in row.code:
            assert importlib.util.find_spec(f"hivtp_vllm.{module}") is not None, module
    assert internals.RELEASES == vllm_compat.SUPPORTED_VLLM


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_every_served_class_keeps_the_data_parallel_encoder_mode(family):
    """vLLM keeps ``--mm-encoder-tp-mode data`` only for a class that declares
    it (else it warns and falls back to "weights"); each family's served
    class does, on itself (vLLM caches the flag by the class's file)."""
    from vllm.model_executor.models.interfaces import supports_multimodal_encoder_tp_data

    module, name = family.model.split(":")
    served = getattr(importlib.import_module(module), name)
    assert supports_multimodal_encoder_tp_data(served)
    assert "supports_encoder_tp_data" in vars(served)
