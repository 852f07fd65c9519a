"""stain: the white cell found by its violet nucleus, and the square crop around it."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from bloodcell_lib.data.stain import cell_box, cell_boxes, nucleus_box

PINK, VIOLET, BACKGROUND = (225, 160, 170), (110, 60, 170), (235, 230, 225)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))


def smear(nucleus: tuple[int, int, int, int] | None, size=(320, 240)) -> Image.Image:
    """Red cells (pink discs), a platelet (small violet dot) and, if given, a nucleus."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x, y in ((30, 30), (250, 180), (60, 190), (280, 40)):
        draw.ellipse((x - 22, y - 22, x + 22, y + 22), fill=PINK)
    draw.ellipse((150, 20, 154, 24), fill=VIOLET)  # a platelet: too small to be a nucleus
    if nucleus is not None:
        draw.ellipse(nucleus, fill=VIOLET)
    return image


def test_nucleus_box_finds_the_largest_violet_region():
    box = nucleus_box(smear((200, 100, 240, 150)))
    assert box is not None
    assert box == pytest.approx((200, 100, 241, 151), abs=3)


def test_no_violet_region_gives_none():
    assert nucleus_box(smear(None)) is None
    assert cell_box(smear(None), 0.5) is None


def test_black_fill_is_not_stain():
    image = smear((200, 100, 240, 150)).rotate(30, fillcolor=(0, 0, 0))
    box = nucleus_box(image)
    assert box is not None and box[2] - box[0] < 60


def test_cell_box_is_a_square_with_margin_inside_the_picture():
    box = cell_box(smear((140, 100, 180, 130)), 0.5)
    assert all(isinstance(edge, int) for edge in box)  # whole pixels, as the manifest keeps boxes
    left, top, right, bottom = box
    assert abs((right - left) - (bottom - top)) <= 1 and right - left == pytest.approx(2 * 41, abs=3)
    assert (left + right) / 2 == pytest.approx(160.5, abs=2) and (top + bottom) / 2 == pytest.approx(115.5, abs=2)
    # A nucleus at the edge: the square is moved inside, not cut.
    left, top, right, bottom = cell_box(smear((290, 200, 320, 240)), 0.5)
    assert right <= 320 and bottom <= 240 and abs((right - left) - (bottom - top)) <= 1
    # A huge margin is capped by the picture's shorter side.
    left, top, right, bottom = cell_box(smear((140, 100, 180, 130)), 5.0)
    assert right - left == pytest.approx(240) and top == 0 and bottom == 240


def test_cell_boxes_of_files_none_for_unreadable(tmp_path: Path):
    good, plain, bad = tmp_path / "good.png", tmp_path / "plain.png", tmp_path / "bad.png"
    smear((200, 100, 240, 150)).save(good)
    smear(None).save(plain)
    bad.write_bytes(b"not an image")
    boxes = cell_boxes([good, plain, bad], 0.5)
    assert boxes[0] is not None and boxes[1] is None and boxes[2] is None
    assert cell_boxes([good, plain, bad], 0.5) == boxes  # the stored answer


def test_join_lobes_finds_the_whole_lobed_nucleus_and_leaves_single_nuclei_alone():
    lobed = smear(None)
    draw = ImageDraw.Draw(lobed)
    for left in (180, 196, 212):  # three lobes with 4-pixel gaps, as a segmented neutrophil's
        draw.ellipse((left, 100, left + 12, 130), fill=VIOLET)
    one_lobe, whole = nucleus_box(lobed), nucleus_box(lobed, join_lobes=True)
    assert one_lobe[2] - one_lobe[0] < 16 and whole == pytest.approx((180, 100, 225, 131), abs=3)
    single = smear((200, 100, 240, 150))
    assert nucleus_box(single, join_lobes=True) == nucleus_box(single)


def test_picture_without_stain_finds_nothing():
    """A grey-green background (KRD-WBC's) and a plain pale one: no nucleus, whatever the threshold adapts to."""
    assert nucleus_box(Image.new("RGB", (512, 512), (180, 175, 160))) is None
    assert nucleus_box(Image.new("RGB", (200, 200), (235, 230, 225)), join_lobes=True) is None
    noisy = Image.effect_noise((512, 512), 20).convert("RGB")
    background = Image.blend(Image.new("RGB", (512, 512), (180, 175, 160)), noisy, 0.1)
    assert nucleus_box(background, join_lobes=True) is None


KRD_PICTURES = ("basophil/image347.jpg", "eosinophil/image15.jpg", "lymphocyte/image24.jpg",
                "monocyte/image148.jpg", "neutrophil/image233.jpg", "neutrophil/image334.jpg")


@pytest.mark.integration
@pytest.mark.parametrize("name", KRD_PICTURES)
def test_krd_cell_found_where_the_mask_is(name):
    """KRD-WBC (purple nuclei, blue barely above red, grey-green background): the nucleus is
    found and its cell square overlaps the set's own mask box at IoU >= 0.5."""
    from bloodcell_lib.data.images import load_rgb
    from bloodcell_lib.data.nuclei import CELL_MARGIN
    from bloodcell_lib.data.stain import square_around
    from bloodcell_lib.evaluation.field_scores import iou
    from bloodcell_lib.evaluation.localisation import krd_mask_path, mask_box
    from tests.conftest import real_data

    picture = real_data("krd", "KRD_WBC", *name.split("/"))
    image = load_rgb(picture)
    nucleus = nucleus_box(image, join_lobes=True)
    assert nucleus is not None
    assert iou(square_around(nucleus, image.size, CELL_MARGIN), mask_box(krd_mask_path(picture))) >= 0.5
