"""examples/svhn_like_pictures.py writes its two small PNGs."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "svhn_like_pictures.py"


def test_the_pictures_example_saves_two_small_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("svhn_like_pictures", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out=tmp_path)
    for name in ("svhn_like.png", "corruptions.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(data) < 150_000
    assert capsys.readouterr().out.count(".png") == 2
