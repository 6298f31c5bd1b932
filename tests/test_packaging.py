"""The package declares what it imports, and the serving path imports no tool.

vLLM imports the serving core in every server process (plugin entry point,
processors, models); ``hivtp_vllm.tools`` (explain, make-model, the test
server harness) is for people and tests. A GPU server that installs the
plugin should need nothing the tools need.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hivtp_vllm"
# Import name -> distribution name, where they differ.
DISTRIBUTION = {
    "PIL": "pillow",
    "prometheus_client": "prometheus-client",
    "pydantic_core": "pydantic",
    "huggingface_hub": "huggingface-hub",
    "typing_extensions": "typing-extensions",
}


def imported(files: list[Path]) -> set[str]:
    """Distributions imported by ``files`` (stdlib and the package itself left out)."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | {"hivtp_vllm", "__future__"}
    return {DISTRIBUTION.get(n, n) for n in names}


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        for stop in "<>=!~[; ":
            requirement = requirement.split(stop)[0]
        return requirement.lower()

    extras = {k: {name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return {name(r) for r in project["dependencies"]}, extras


def core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts]


def test_core_declares_exactly_what_it_imports():
    core, extras = declared()
    assert imported(core_files()) == core | {"vllm"}
    assert extras["gpu"] == {"vllm"}


def test_tools_extra_covers_the_tools():
    core, extras = declared()
    needed = imported(list((PACKAGE / "tools").rglob("*.py"))) - core - {"vllm"}
    assert needed == extras["tools"]


def test_serving_path_imports_no_tool():
    code = (
        "import sys, hivtp_vllm; hivtp_vllm.register()\n"
        "import importlib\n"
        "for target in hivtp_vllm.MODELS.values():\n"
        "    importlib.import_module(target.split(':')[0])\n"
        "import hivtp_vllm.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('hivtp_vllm')))\n"
        "bad = [m for m in sys.modules if m.startswith('hivtp_vllm.tools')]\n"
        "sys.exit(f'serving path imported {bad}' if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hivtp_vllm.models.llava_next" in done.stdout  # it did load the models
