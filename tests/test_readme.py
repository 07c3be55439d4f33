"""Every ```python block of README.md runs as written, offline.

The API tour loads ``runs/main_job/pcme``, which README command 1 trains; here a tiny model of the
same kind (a PCMEModel with its processor) stands in for it, saved to that path under a temporary
working directory. A block whose first line is ``# illustrative`` is skipped (keep such blocks rare).
"""

import re
from pathlib import Path

import pytest

from hf_pcme import PCMEModel
from hf_pcme.testing import tiny_pcme_config, tiny_processor

REPO = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M)
SKIP_MARK = "# illustrative"


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3
    assert sum(block.startswith(SKIP_MARK) for block in BLOCKS) <= 1


@pytest.fixture
def readme_workdir(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "main_job" / "pcme"
    PCMEModel(tiny_pcme_config(init_log_sigma2=-2.0)).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    (tmp_path / "metrics").symlink_to(REPO / "metrics", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number, readme_workdir, capsys):
    block = BLOCKS[number]
    if block.startswith(SKIP_MARK):
        pytest.skip("marked illustrative")
    exec(compile(block, f"README.md python block {number + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip(), "each README block should show its result"
