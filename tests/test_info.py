"""``flexkd info``: the console entry and the module entry print the same facts."""

import json
import subprocess
import sys

from flexkd import info
from flexkd.cli import main


def test_collect_reports_versions_and_resolution():
    facts = info.collect()
    assert facts["torch"]
    assert set(facts["auto_resolves_to"]) == {"flex_feature_loss", "importance_scores", "linear_logit_kd"}
    assert facts["auto_resolves_to"]["flex_feature_loss"]["cpu"] in ("cpu", "torch")
    assert facts["native_extension"]["loaded"] == (facts["native_extension"]["error"] is None)
    if facts["native_extension"]["loaded"]:
        assert facts["native_extension"]["build"]["torch_version"]


def test_cli_json(capsys):
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flexkd"]


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "flexkd.info"], capture_output=True, text=True, check=True).stdout
    assert "backend=auto resolves to" in out and "flexkd._C" in out
