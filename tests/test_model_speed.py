"""benchmarks/model_speed.py: runs on tiny inputs and writes what it prints; asserts no speed."""
from __future__ import annotations

import json

import pytest

from conftest import benchmark_script


@pytest.fixture(scope="module")
def model_speed():
    with benchmark_script("model_speed") as module:
        yield module


def test_each_model_measured_in_every_round_and_written(model_speed, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert model_speed.main(["--models", "efficientnet_lite1", "resnet18", "--image-size", "32",
                             "--batch-size", "2", "--steps", "1", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["best"]) == ["efficientnet_lite1", "resnet18"]
    for name, rounds in result["rounds"].items():
        assert len(rounds) == 2
        best = result["best"][name]
        assert best["train_images_per_second"] == max(r["train_images_per_second"] for r in rounds) > 0
        assert best["predict_images_per_second"] == max(r["predict_images_per_second"] for r in rounds) > 0
    assert result["best"]["resnet18"]["parameters"] == 11_178_564  # resnet18 with a 4-class head
    printed = capsys.readouterr().out
    assert "| `efficientnet_lite1` | 4.1 M |" in printed and result["table_markdown"] in printed


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps must be >= 1"),
                                           (["--models", "resnet9"], "invalid choice: 'resnet9'")])
def test_wrong_options_stop_before_any_work(model_speed, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        model_speed.main([*argv, "--out", str(tmp_path / "never.json")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()
