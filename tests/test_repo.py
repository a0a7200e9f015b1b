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
