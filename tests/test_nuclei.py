"""nuclei.py: every white cell of a smear field, lobes joined, platelets and pale fields left out."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bloodcell_lib.data import stain
from bloodcell_lib.data.images import load_rgb
from bloodcell_lib.data.nuclei import find_nuclei
from tests.conftest import real_data

PINK, VIOLET, BACKGROUND = (220, 150, 160), (90, 40, 160), (235, 225, 230)


def field(blobs, size=(640, 480)):
    """A synthetic field: pink red cells, and violet discs (x, y, radius) on a pale background."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    yy, xx = np.mgrid[:height, :width]
    for x, y in ((100, 400), (500, 80)):
        pixels[(xx - x) ** 2 + (yy - y) ** 2 < 40 ** 2] = PINK
    for x, y, r in blobs:
        pixels[(xx - x) ** 2 + (yy - y) ** 2 < r ** 2] = VIOLET
    return Image.fromarray(pixels)


def test_two_separate_nuclei_are_two_cells():
    found = find_nuclei(field([(150, 150, 45), (450, 320, 40)]))
    assert len(found) == 2
    assert found[0].nucleus[0] < 150 < found[0].nucleus[2] and found[1].nucleus[0] < 450 < found[1].nucleus[2]
    for cell in found:  # the cell box holds its nucleus
        assert cell.cell[0] <= cell.nucleus[0] and cell.cell[2] >= cell.nucleus[2]


def test_lobes_close_together_are_one_cell():
    lobes = [(300, 240, 22), (345, 240, 22), (322, 282, 22)]  # gaps of a few pixels, as a neutrophil's
    assert len(find_nuclei(field(lobes))) == 1


def test_platelets_and_pale_fields_give_no_cell():
    assert find_nuclei(field([(200, 200, 8), (400, 300, 7)])) == []  # platelet-sized dots only
    assert find_nuclei(field([])) == []
    assert find_nuclei(Image.new("RGB", (640, 480), (240, 238, 240))) == []


def test_platelet_beside_a_nucleus_is_not_counted():
    found = find_nuclei(field([(200, 240, 45), (520, 100, 8)]))
    assert len(found) == 1 and found[0].nucleus[2] < 300


def test_rgba_picture_is_read():
    rgba = field([(320, 240, 45)]).convert("RGBA")
    assert len(find_nuclei(rgba)) == 1


def test_single_cell_box_unchanged_by_refactor():
    """stain.cell_box must give the boxes it gave before violet_mask/square_around were split off."""
    image = field([(150, 150, 45), (450, 320, 40)])
    assert stain.nucleus_box(image) == (104.0, 104.0, 196.0, 196.0)
    assert stain.cell_box(image, 0.15) == (90, 90, 210, 210)


@pytest.mark.integration
def test_bccd_two_cell_field_both_found():
    folder = real_data("blood-cells", "dataset-master", "JPEGImages")
    found = find_nuclei(load_rgb(folder / "BloodImage_00043.jpg"))  # NEUTROPHIL, MONOCYTE
    assert len(found) == 2


def test_background_only_field_gives_no_cell():
    """KRD-WBC's grey-green background and grey-mauve red cells, no white cell: nothing found."""
    pixels = np.empty((512, 512, 3), dtype=np.uint8)
    pixels[:] = (180, 175, 160)
    yy, xx = np.mgrid[:512, :512]
    for x, y in ((100, 100), (300, 150), (200, 400), (420, 380)):
        pixels[(xx - x) ** 2 + (yy - y) ** 2 < 35 ** 2] = (150, 125, 140)
    assert find_nuclei(Image.fromarray(pixels)) == []


@pytest.mark.integration
@pytest.mark.parametrize("name", ["lymphocyte/image24.jpg", "monocyte/image148.jpg", "neutrophil/image233.jpg",
                                  "neutrophil/image334.jpg"])
def test_krd_field_one_cell_on_the_mask(name):
    """KRD-WBC: find_nuclei finds the picture's one white cell where the set's mask puts it."""
    from bloodcell_lib.evaluation.field_scores import match_boxes
    from bloodcell_lib.evaluation.localisation import krd_mask_path, mask_box

    picture = real_data("krd", "KRD_WBC", *name.split("/"))
    found = find_nuclei(load_rgb(picture))
    assert len(found) == 1
    assert match_boxes([found[0].cell], [mask_box(krd_mask_path(picture))]) == [(0, 0)]
