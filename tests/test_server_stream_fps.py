"""benchmarks/stream_fps.py end to end on the tiny networks: every mode measured, CSV written with the machine."""
from __future__ import annotations

import csv

import pytest

from conftest import ASSETS
from liveportrait_triton.benchmarks import stream_fps

pytestmark = pytest.mark.server


def test_stream_fps_measures_every_mode(tiny_repository, tiny_weights_dir, tmp_path, capsys):
    table = tmp_path / "fps.csv"
    code = stream_fps.main(["--repository", str(tiny_repository), "--weights", str(tiny_weights_dir),
                            "--config", "tiny", "--frames", "1", "--streams", "2", "--warmup", "0",
                            "--source", str(ASSETS / "source" / "s0.jpg"),
                            "--driving", str(ASSETS / "driving" / "d0.mp4"), "--csv", str(table)])
    assert code == 0
    rows = list(csv.DictReader(table.open()))
    modes = {(r["mode"], int(r["streams"])) for r in rows}
    assert modes == {(m, s) for m in ("in-process PyTorch", "in-process served runtimes", "Triton gRPC streams")
                     for s in (1, 2)}
    for r in rows:
        assert int(r["frames"]) == int(r["streams"])
        # the rate is the frames over the measured time, and that time is a real run: longer than a tiny frame's
        # compute could ever be skipped (1 ms) and shorter than the test's limit
        assert 0.001 < float(r["seconds"]) < 600, r
        assert float(r["frames_per_s"]) == pytest.approx(int(r["frames"]) / float(r["seconds"]), rel=2e-3, abs=1e-3)
    assert rows[0]["version_onnxruntime"] and rows[0]["cpus"]
    assert "orchestration" in capsys.readouterr().out
