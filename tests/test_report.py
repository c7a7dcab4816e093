"""The main job, `python -m resnet_fast`, on a tiny CPU configuration."""
import subprocess
import sys

import pytest

from resnet_fast import report


def test_report_runs_and_passes(capsys):
    assert report.main(["--arch", "resnet18", "--batch", "2", "--size", "32", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "img/s" in out and "conv_bn_act on torch x19, stem on torch x1" in out and "torchvision" in out and "resnet_fast" in out


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_fast", "--arch", "resnet18", "--batch", "1", "--size", "32", "--iters", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "parity vs float64 reference" in proc.stdout


def test_report_rejects_unknown_arch():
    with pytest.raises(SystemExit):
        report.main(["--arch", "resnet9"])
