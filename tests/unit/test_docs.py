"""The README stays in step with the code and with CI."""

import re
from pathlib import Path

from ccm_shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme():
    for name in Settings.model_fields:
        assert f"`CCM_{name.upper()}`" in README, f"CCM_{name.upper()} missing from README"


def test_the_readme_documents_no_setting_the_code_does_not_read():
    documented = set(re.findall(r"^\| `CCM_([A-Z_]+)`", README, flags=re.M))
    known = {n.upper() for n in Settings.model_fields}
    assert documented <= known, documented - known


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"\*\*Run the tests\*\*.*?```bash\n(.*?)\n```", README, flags=re.S)
    assert blocks == ["uv run pytest"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == blocks[0]
