"""`bash scripts/device_check.sh --rehearse`: the prepared GPU check runs its steps on the CPU (tiny networks)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.server


def test_rehearsal_runs_every_step_and_writes_its_report(tmp_path):
    report = tmp_path / "device_check.md"
    result = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--rehearse", "--report", str(report)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert text.rstrip().endswith("Sections failed: none"), text
    for title in ("Per-module latency", "Served pipeline, bf16, one instance", "two instances of W and G",
                  "Served pipeline, fp32", "Served frames compared"):
        assert re.search(rf"^## .*{title}", text, re.M), title
    for module, paper in (("F", "0.82"), ("M", "0.84"), ("W", "5.21"), ("G", "7.59"), ("S", "0.31")):
        assert re.search(rf"\| {module} \([a-z_]+\) \| 1 \| [\d.]+ \| [\d.]+ \| {paper} \|", text), module
    # every sweep level served frames (a failed level shows 'failed:')
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| n/a \(no GPU\) \|$", text, re.M)
    assert [r[0] for r in rows] == ["1", "2", "1", "2", "1"], text
    assert all(float(r[1]) > 0 and float(r[3]) >= float(r[2]) > 0 for r in rows)
    # the served fp32 pipeline is the in-process one: identical frames on the CPU (precision.drift_markdown)
    assert "| fp32 served vs fp32 in-process | levels | 0 | 0 | 0.00% | 0.00% | yes |" in text
    assert re.search(r"^\| bf16 served vs fp32 served \| levels \| \d+ \| [\d.]+ \|", text, re.M), text
    # the reduced sub-networks' drift on the device, M and the MLPs left out (always fp32)
    assert re.search(r"^## Drift per sub-network, bf16 vs fp32 on cpu", text, re.M)
    assert "| spade_generator.image | levels |" in text and "motion_extractor." not in text.split("Drift per")[-1]
