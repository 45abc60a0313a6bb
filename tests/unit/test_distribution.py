"""What the distribution promises: every imported package is declared, the light client
works without the model stack, the policies ship inside the package, `--version` answers.

The whole-wheel checks (a fresh venv per install, real Redis) are scripts/check_dist.sh,
a step of scripts/test.sh; these catch the same mistakes in seconds.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from tests.cli_runner import run_cli
from tests.processes import run_python
from worker.about import SERVE_MODULES, versions
from worker.settings import SHIPPED_POLICY_DIR, Settings

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalise(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


BASE = _requirement_names(PYPROJECT["project"]["dependencies"])
SERVE = _requirement_names(PYPROJECT["project"]["optional-dependencies"]["serve"])


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files importing it, for modules outside the stdlib."""
    found: dict[str, set[str]] = {}
    for package in ("worker", "adapters"):
        for path in (ROOT / package).rglob("*.py"):
            for name in _top_level_imports(path):
                if name not in sys.stdlib_module_names and name not in {"worker", "adapters"}:
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared() -> None:
    owners = metadata.packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        distributions = {_normalise(d) for d in owners.get(module, [])}
        assert distributions, f"{module} (imported by {sorted(files)}) is not installed"
        if not distributions & (BASE | SERVE):
            undeclared[module] = sorted(files)
    assert not undeclared, f"declare these in pyproject.toml: {undeclared}"


def test_serve_modules_are_exactly_the_serve_extra() -> None:
    """worker.about.SERVE_MODULES (what the CLI names when it is missing) is the serve
    extra's import names, and nothing the base install needs."""
    owners = metadata.packages_distributions()
    imported = set(_third_party_imports())
    serve_modules = {m for m in imported if {_normalise(d) for d in owners[m]} & SERVE}
    assert serve_modules == SERVE_MODULES
    assert not SERVE & BASE


LIGHT = f"""
import sys
for name in {sorted(SERVE_MODULES)!r}:
    sys.modules[name] = None  # `import torch` raises ImportError, as where it is not installed
"""


def test_client_and_light_commands_import_no_model_stack() -> None:
    proc = run_python(
        LIGHT
        + """
import worker.client, worker.cli
from typer.testing import CliRunner
runner = CliRunner()
for args in (["--help"], ["submit", "--help"], ["result", "--help"], ["dlq", "--help"],
             ["health", "--help"], ["--version"], ["classify", "--help"]):
    out = runner.invoke(worker.cli.app, args)
    assert out.exit_code == 0, (args, out.output)
print("light ok")
""",
        env=os.environ,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "light ok" in proc.stdout


def test_a_model_command_without_the_serve_extra_names_it() -> None:
    proc = run_python(
        LIGHT
        + """
import sys
from worker.cli import main
sys.argv = ["worker", "classify", "nowhere.png"]
main()
""",
        env=os.environ,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "needs the model stack" in line
    assert "pip install 'moderation-worker[serve]'" in line


def test_policies_ship_inside_the_package_and_are_the_default() -> None:
    assert SHIPPED_POLICY_DIR.parent == ROOT / "worker"
    assert sorted(p.name for p in SHIPPED_POLICY_DIR.glob("*.yaml")) == [
        "moderation.yaml",
        "tags.yaml",
    ]
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["worker"]
    assert f"{SHIPPED_POLICY_DIR.name}/*.yaml" in package_data
    assert Settings().policy_dir == SHIPPED_POLICY_DIR


def test_version_names_the_package_torch_open_clip_and_model() -> None:
    out = run_cli(
        "--version",
        env={"WORKER_MODEL__NAME": "local-dir:/models/ours", "WORKER_MODEL__PRETRAINED": ""},
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["moderation-worker"] == metadata.version("moderation-worker")
    assert lines["torch"] == metadata.version("torch")
    assert lines["open_clip_torch"] == metadata.version("open_clip_torch")
    assert lines["model"] == "local-dir:/models/ours"
    assert set(versions()) <= set(lines)


def test_finetune_help_lists_the_real_template_sets() -> None:
    from worker.cli.finetune import TEMPLATE_SET_NAMES
    from worker.policy.templates import TEMPLATE_SETS

    assert tuple(TEMPLATE_SETS) == TEMPLATE_SET_NAMES
