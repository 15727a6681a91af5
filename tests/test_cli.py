import re
import subprocess
import sys
from pathlib import Path

from subq.cli import capability_markdown, main
from subq.registry import mechanisms

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_generated_from_registry():
    text = README.read_text()
    block = re.search(r"<!-- capability-table:start -->\n(.*?)<!-- capability-table:end -->",
                      text, re.S)
    assert block, "README.md lacks the capability-table markers"
    assert block.group(1) == capability_markdown(), (
        "README's capability table is stale: paste the output of `subq list --markdown`")


def test_list_names_every_mechanism(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for mech in mechanisms():
        assert mech.name in out


def test_python_dash_m_subq_list_markdown():
    out = subprocess.run([sys.executable, "-m", "subq", "list", "--markdown"],
                         capture_output=True, text=True, check=True).stdout
    assert out == capability_markdown()
