"""modeling.checkpoint: one format, written by training, read by training and prediction."""
from __future__ import annotations

import pytest
import torch

from bloodcell_lib.modeling import checkpoint
from bloodcell_lib.modeling.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

CONTENT = {"model": {"w": torch.ones(2)}, "class_names": ["a", "b"], "model_name": "resnet18",
           "data_config": {"image_size": 32}, "rng_state": torch.get_rng_state()}


def test_saved_checkpoint_reads_back_with_format_and_version(tmp_path):
    path = save_checkpoint(CONTENT, tmp_path / "c.pt")
    ckpt = read_checkpoint(path)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["format_version"] == checkpoint.VERSION
    assert torch.equal(ckpt["model"]["w"], torch.ones(2)) and torch.equal(ckpt["rng_state"], CONTENT["rng_state"])


@pytest.mark.parametrize("change, message", [
    ({"format_version": checkpoint.VERSION + 1}, "format_version 2"),
    ({"format_version": 0}, "format_version 0"),
    ({"format": "other"}, "is not a bloodcell checkpoint"),
])
def test_other_formats_and_versions_are_refused_naming_the_file(tmp_path, change, message):
    path = tmp_path / "odd.pt"
    torch.save({"format": checkpoint.FORMAT, "format_version": checkpoint.VERSION, **CONTENT, **change}, path)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_keys_and_non_checkpoints_are_refused(tmp_path):
    path = save_checkpoint({k: v for k, v in CONTENT.items() if k != "data_config"}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt lacks checkpoint key.*data_config"):
        read_checkpoint(path)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt is not a bloodcell checkpoint"):
        read_checkpoint(tmp_path / "notes.pt")
    assert issubclass(CheckpointError, ValueError)
