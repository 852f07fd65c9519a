"""Pictures as the model's input contract frames them: files and folders walked as ``predict``
walks them, every picture given the training crop (``crop_like_training``) and size, and the
one-line statement of that preprocessing. ``predict``, ``count``, the adaptation commands and
the labelled-cell readers all read pictures here, so a model sees new pictures as it saw its
training ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from bloodcell_lib.modeling.loaded import CROPPING_MODES, LoadedModel


def iter_files(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str | None]]:
    """(file, None) for every file under ``paths`` (folders walked recursively, sorted);
    (path, reason) for a path that does not exist or is not a regular file or folder."""
    seen: set[str] = set()
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: str(f))
            if not found:
                yield str(p), "folder holds no files"
            for f in found:
                key = str(f.resolve())
                if key not in seen:
                    seen.add(key)
                    yield str(f), None
        elif p.is_file():
            key = str(p.resolve())
            if key not in seen:
                seen.add(key)
                yield str(p), None
        elif p.exists():
            yield str(p), "not a regular file or folder"
        else:
            yield str(p), "no such file or folder"


CROP_FOUND = "stain (found)"
CROP_NOT_FOUND = "none: no nucleus found"


@dataclass(frozen=True)
class Framed:
    """A picture as the model's input contract frames it: ``image`` (the crop), ``note`` (what
    was done, None for a model trained on whole pictures) and ``nucleus_px`` (``crop: window``:
    the nucleus's longer side in picture pixels, NaN when none was found or not measured)."""

    image: Any
    note: str | None
    nucleus_px: float = float("nan")


def frame_like_training(img: Any, data_config: dict[str, Any]) -> Framed:
    """``crop_like_training`` with the nucleus size a ``crop: window`` model's scale check reads."""
    from bloodcell_lib.data.stain import nucleus_side, window_box

    if data_config.get("crop") == "window":
        window = window_box(img, int(data_config.get("crop_window", 200)))
        return Framed(img if window.box is None else img.crop(window.box), window.note, nucleus_side(window.nucleus))
    return Framed(*crop_like_training(img, data_config))


def crop_like_training(img: Any, data_config: dict[str, Any]) -> tuple[Any, str | None]:
    """(picture, what was done) for a model trained on crops. ``crop: stain`` (and ``nucleus``,
    lobes joined) models get the crop found in the picture; so do ``crop: cell`` models, trained on annotated WBC
    boxes that new pictures do not have (the cell box estimated around the largest nucleus,
    ``nuclei.crop_box``, grown by the checkpoint's margin). Where no nucleus is found the whole picture is
    used and the note says so. ``crop: window`` models get their fixed-pixel square centred on the
    nucleus (``stain.window_box``; the note says how it was placed). Models trained on whole
    pictures: (img, None)."""
    from bloodcell_lib.data.nuclei import crop_box, find_nuclei
    from bloodcell_lib.data.stain import cell_box, window_box

    crop = data_config.get("crop")
    if crop not in CROPPING_MODES:
        return img, None
    if crop == "window":
        window = window_box(img, int(data_config.get("crop_window", 200)))
        return (img if window.box is None else img.crop(window.box)), window.note
    if crop == "cell":  # the annotated box stood round the whole cell: the estimated cell box, as count does
        found = max(find_nuclei(img), key=lambda n: n.area, default=None)
        box = None if found is None else crop_box(found, data_config, img.size)
    else:
        box = cell_box(img, float(data_config.get("crop_margin", 0.15)), crop == "nucleus")
    return (img, CROP_NOT_FOUND) if box is None else (img.crop(box), CROP_FOUND)


def load_framed(path: str, image_size: int,
                data_config: dict[str, Any]) -> tuple[torch.Tensor | None, Framed | None, str | None]:
    """(tensor, Framed, None), or (None, None, reason) for a file that cannot be read: one
    file as the model saw its training pictures (``frame_like_training``)."""
    from bloodcell_lib.data.images import ImageLoadError, load_rgb
    from bloodcell_lib.data.transforms import pil_to_uint8

    try:
        framed = frame_like_training(load_rgb(path), data_config)
        return pil_to_uint8(framed.image, image_size), framed, None
    except ImageLoadError as err:
        return None, None, err.reason
    except Exception as err:  # any other decoder failure is reported, never a crash mid-run
        return None, None, f"cannot be read as an image ({type(err).__name__}: {err})"


def _load_one(path: str, image_size: int,
              data_config: dict[str, Any]) -> tuple[torch.Tensor | None, str | None, str | None]:
    """(tensor, crop note, None), or (None, None, reason): ``load_framed`` without the measurements."""
    tensor, framed, reason = load_framed(path, image_size, data_config)
    return tensor, None if framed is None else framed.note, reason


def preprocessing_summary(loaded: LoadedModel) -> str:
    """One line naming the preprocessing every picture gets: the checkpoint's crop, size and
    colour normalisation (whether each picture's crop was found is in the predictions'
    ``crop`` column and the summary)."""
    size = loaded.image_size
    config = loaded.data_config
    margin = float(config.get("crop_margin", 0.15))
    crops = {"stain": f"square around the stained nucleus (margin {margin:g}) where one is found, else the whole picture",
             "nucleus": f"square around the nucleus, its lobes joined, sized from the nucleus (margin {margin:g}) "
                        "where one is found, else the whole picture",
             "window": f"a {int(config.get('crop_window', 200))}-pixel square of the picture centred on the nucleus "
                       "(the picture's own scale; whole when not larger)",
             "cell": "the cell box estimated from the stained nucleus (the model trained on annotated WBC boxes) "
                     "where one is found, else the whole picture"}
    crop = crops.get(config.get("crop"), "whole picture (no crop)")
    colour = config.get("color_norm")
    colours = (f"colours moved to the training pictures' L*a*b* mean/std (Reinhard, reference of {colour['n']} "
               "training pictures)" if colour else "no colour normalisation")
    return (f"preprocessing: {crop}, resized to {size}x{size}, {colours}, normalised with the checkpoint's "
            "mean/std")
