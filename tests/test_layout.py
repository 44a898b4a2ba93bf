"""The layout is a contract too: imports point one way, the Bento ships only the serving runtime, and the README's
Layout section names every module that exists (and nothing that does not)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _layout_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block, "README.md's Layout section has no ```text block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_import_linter_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and done.stdout.count("KEPT") >= 3


def test_every_path_the_readme_layout_names_exists_and_every_module_is_named():
    named = set()
    for line in _layout_lines():
        path = line.split()[0]
        if line.startswith(" "):  # a continuation of the description above
            continue
        assert (ROOT / path).exists(), f"README Layout names {path}, which does not exist"
        named.add(path.rstrip("/"))
    modules = sorted(
        str(p.relative_to(ROOT))
        for folder in ("tasks", "flows")
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "__init__.py"
    )
    missing = [m for m in modules if m not in named]
    assert not missing, f"README Layout does not name {missing}"


def _project_imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return {name for name in imported if name.split(".")[0] in {"tasks", "flows"}}


def test_the_bento_ships_the_serving_runtime_and_what_it_imports_nothing_else():
    include = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    assert include == ["service.py", "tasks/__init__.py", "tasks/serving/*.py", "tasks/common/*.py"]
    shipped = [
        ROOT / "service.py",
        *(ROOT / "tasks" / "serving").glob("*.py"),
        *(ROOT / "tasks" / "common").glob("*.py"),
    ]
    for path in shipped:
        outside = {m for m in _project_imports(path) if not m.startswith(("tasks.serving", "tasks.common"))}
        assert not outside, f"{path.relative_to(ROOT)} imports {outside}, which the Bento does not ship"


def test_the_environment_is_read_only_through_the_settings_of_each_runtime():
    """flows/settings.py (orchestration) and tasks/serving/settings.py (serving) read the environment; elsewhere it is
    only handed on whole to a child process (`{**os.environ, ...}`), or, once, written for the in-process flow."""
    allowed = {ROOT / "flows" / "settings.py", ROOT / "tasks" / "serving" / "settings.py"}
    written = {("flows/cli.py", 'os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri')}
    readers = []
    for path in [ROOT / "service.py", *(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        if path in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            handed_on = "{**os.environ" in line.replace(" ", "") or line.strip() == "**os.environ,"
            if re.search(r"os\.environ|os\.getenv", line) and not handed_on:
                if (str(path.relative_to(ROOT)), line.strip()) not in written:
                    readers.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not readers, "reads the environment outside the settings:\n" + "\n".join(readers)
