"""`liveportrait-triton examples`: the README's example media, made locally (no server)."""
from __future__ import annotations

import numpy as np

from liveportrait_triton.cli import main
from liveportrait_triton.client import media
from liveportrait_triton.client.faces import MediapipeFaceAnalyzer
from liveportrait_triton.client.templates import load_template


def test_examples_write_a_portrait_a_driving_clip_a_template_and_a_faceless_clip(tmp_path, capsys):
    assert main(["examples", "--out", str(tmp_path), "--frames", "10", "--fps", "10"]) == 0
    printed = capsys.readouterr().out
    names = {"portrait.png", "driving.mp4", "head_turn.npz", "no_face.mp4"}
    assert {p.name for p in tmp_path.iterdir()} == names and all(name in printed for name in names)
    analyzer = MediapipeFaceAnalyzer()
    try:
        assert analyzer.detect(media.read_image(tmp_path / "portrait.png")) is not None
        driving = [f.copy() for f in media.VideoReader(tmp_path / "driving.mp4")]
        assert len(driving) == 10 and all(analyzer.detect(f) is not None for f in driving), "a face in every frame"
        assert np.abs(driving[0].astype(int) - driving[3]).mean() > 5, "the face moves"
        faceless = [f.copy() for f in media.VideoReader(tmp_path / "no_face.mp4")]
        assert faceless and all(analyzer.detect(f) is None for f in faceless), "no face in any frame"
    finally:
        analyzer.close()
    template = load_template(tmp_path / "head_turn.npz")
    assert len(template) == 10 and template.fps == 10 and template.eye_ratio.shape == (10, 2)
    assert template.eye_ratio.min() < 0.05 < 0.3 < template.eye_ratio.max(), "one blink"
