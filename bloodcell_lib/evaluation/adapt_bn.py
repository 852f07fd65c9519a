"""A folder of one lab's unlabelled cells read as ``predict`` reads pictures, and BatchNorm
statistics re-estimated on it (``adapt --unlabelled``; ``predict``/``count --adapt`` go through
``unlabelled_adapt``, whose ``adabn`` method is the same re-estimation).

The adaptation pictures are read exactly as ``predict`` reads the pictures it classifies
(``pictures._load_one``: the checkpoint's crop and resize), so the statistics describe what
the model will see. Files that cannot be read are listed with the reason, as in predict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from bloodcell_lib.evaluation.pictures import _load_one, iter_files
from bloodcell_lib.modeling.adaptation import adapt_batchnorm
from bloodcell_lib.modeling.loaded import LoadedModel


@dataclass
class BatchNormAdaptation:
    """What ``adapt_to_folder`` did: ``folder``, ``n_images`` used, ``n_layers`` re-estimated,
    ``skipped`` (path, reason) for files that could not be used."""

    folder: str
    n_images: int
    n_layers: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"adaptation: BatchNorm statistics of {self.n_layers} layer(s) re-estimated on "
                 f"{self.n_images} unlabelled image(s) from {self.folder}"]
        lines += [f"  adaptation skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def load_folder_images(folder: str | os.PathLike, loaded: LoadedModel) -> tuple[torch.Tensor, list[str],
                                                                                   list[tuple[str, str]]]:
    """uint8 [N, 3, S, S] of every readable picture under ``folder`` (recursively, sorted),
    their paths, and (path, reason) for every file that could not be used."""
    size = loaded.image_size
    tensors, paths, skipped = [], [], []
    for path, reason in iter_files([folder]):
        tensor = None
        if reason is None:
            tensor, _, reason = _load_one(path, size, loaded.data_config)
        if reason is not None:
            skipped.append((path, reason))
        else:
            tensors.append(tensor)
            paths.append(path)
    images = torch.stack(tensors) if tensors else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return images, paths, skipped


def adapt_to_folder(loaded: LoadedModel, folder: str | os.PathLike, *,
                    batch_size: int = 64) -> BatchNormAdaptation:
    """Re-estimate ``loaded.model``'s BatchNorm statistics (in place) on the pictures under ``folder``.
    ValueError naming the folder when fewer than 2 pictures are readable."""
    images, _, skipped = load_folder_images(folder, loaded)
    if len(images) < 2:
        reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        raise ValueError(f"--adapt {folder}: BatchNorm adaptation needs at least 2 readable pictures, "
                         f"found {len(images)}" + (f" ({reasons})" if reasons else ""))
    done = adapt_batchnorm(loaded, images, batch_size=max(2, batch_size))
    return BatchNormAdaptation(str(folder), done["n_images"], done["n_layers"], skipped)
