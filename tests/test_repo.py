"""The README's promises about the repository itself."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Run the tests, on a fresh machine:\s*```bash\n(.+?)\n```", readme).group(1)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_kernels_install_under_the_esm2lite_namespace(tmp_path):
    """kernels/ is installed as esm2lite.kernels; the top-level name `kernels` (a PyPI distribution,
    Hugging Face's kernel hub) is never this project's, wherever Python starts."""
    import subprocess
    import sys
    code = ("import importlib.util, esm2lite.kernels as k; s = importlib.util.find_spec('kernels'); "
            "print(k.lora_linear.__module__); print(s.origin if s else 'none')")
    ours, top = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               check=True).stdout.split()
    assert ours == "esm2lite.kernels.lora"
    assert top == "none" or not Path(top).resolve().is_relative_to(ROOT), top


def _package_modules() -> dict:
    """{esm2lite module name: parsed source} for every module of the package (esm2lite/**/*.py,
    and kernels/ as esm2lite.kernels)."""
    import ast

    modules = {}
    for base, prefix in ((ROOT / "esm2lite", "esm2lite"), (ROOT / "kernels", "esm2lite.kernels")):
        for p in base.rglob("*.py"):
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = ast.parse(p.read_text())
    return modules


def _imports(name: str, tree, modules) -> set:
    """The esm2lite modules `name` imports, at module level or inside functions (relative imports
    resolved; `from package import module` counts as importing the module)."""
    import ast

    found = set()
    package = name if name in modules and (ROOT / "esm2lite" / "/".join(name.split(".")[1:]) / "__init__.py").exists() \
        else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    found.add(f"{base}.{a.name}")
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def test_no_import_cycle_between_esm2lite_modules():
    """The imports between esm2lite's modules, function-level ones included, form no cycle: each
    module can be read knowing only those it imports (a package's __init__ counts as the package)."""
    modules = _package_modules()
    graph = {name: _imports(name, tree, modules) for name, tree in modules.items()}
    seen, done = set(), set()

    def visit(m, path):
        assert m not in seen or m in done, " -> ".join(path + [m])  # back on the current path: a cycle
        if m in seen:
            return
        seen.add(m)
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this module's own": no module imports another's private name."""
    import ast

    crossing = []
    for name, tree in _package_modules().items():
        for node in ast.walk(tree):
            ours = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("esm2lite"))
            if ours:
                crossing += [f"{name}: from {'.' * node.level}{node.module or ''} import {a.name}"
                             for a in node.names if a.name.startswith("_")]
    assert not crossing, "\n".join(crossing)


def test_functions_and_modules_stay_small():
    """The size limits of the project's style: no function in esm2lite/ over 60 lines, no module
    over 400."""
    import ast

    for name, tree in _package_modules().items():
        assert tree.body[-1].end_lineno <= 400, name
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{name}.{node.name}"


def test_no_module_outside_the_tasks_package_names_a_task():
    """Tasks are objects (esm2lite/tasks/): no other module holds a task's name as a string, so none
    can branch on it; a new task is a new file in tasks/."""
    import ast

    from esm2lite.tasks import TASKS

    named = [f"{name}: {node.value!r} (line {node.lineno})" for name, tree in _package_modules().items()
             if not name.startswith("esm2lite.tasks") for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and node.value in TASKS]
    assert not named, "\n".join(named)


@pytest.mark.parametrize("command", ["esm2lite-train", "esm2lite-infer", "esm2lite-export", "esm2lite-convert",
                                     "esm2lite-plot"])
def test_installed_commands_name_themselves(command):
    """setup.py's console scripts: installed with the package, each --help naming itself."""
    import shutil
    import subprocess

    path = shutil.which(command)
    assert path, f"{command} is not installed (pip install -e . makes it)"
    r = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {command} "), r.stdout[:200] + r.stderr[-500:]
