"""The README's promises about the repository itself."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Run the tests, on a fresh machine:\s*```bash\n(.+?)\n```", readme).group(1)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
