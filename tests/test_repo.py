"""The README's promises about the repository itself."""

import re
from pathlib import Path

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
    """{esm2lite module name: parsed source} for esm2lite/*.py."""
    import ast

    return {f"esm2lite.{p.stem}": ast.parse(p.read_text()) for p in (ROOT / "esm2lite").glob("*.py")}


def test_no_import_cycle_between_esm2lite_modules():
    """Module-level imports between esm2lite's modules form no cycle: each module can be read
    knowing only those it imports."""
    import ast

    modules = _package_modules()
    graph = {}
    for name, tree in modules.items():
        graph[name] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [f"esm2lite.{node.module}"] if node.module else [f"esm2lite.{a.name}" for a in node.names]
                graph[name] |= {t for t in targets if t in modules}
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


def test_functions_and_modules_stay_small():
    """The size limits of the project's style: no function in esm2lite/ over 60 lines, no module
    over 400."""
    import ast

    for name, tree in _package_modules().items():
        assert tree.body[-1].end_lineno <= 400, name
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{name}.{node.name}"
