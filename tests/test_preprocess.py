"""FOV crop, pad and resize: the one path from photograph to model input, and back for heatmaps."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from retinagate.card import CamGrid, Preprocessing
from retinagate.preprocess import fov_box, prepare, prepare_batch, prepare_with_geometry
from retinagate.synth import Fundus, render_fundus

PRE = Preprocessing(input_size=224)


def fundus(seed: int = 1, width: int = 512, height: int = 384, columns: tuple[str, ...] = ("DR",)) -> Fundus:
    return render_fundus(np.random.default_rng(seed), width, height, columns, "R", mode="easy")


def true_box(f: Fundus, left: int = 0, top: int = 0) -> tuple[float, float, float, float]:
    (cx, cy), r = f.fov_centre, f.fov_diameter / 2
    return cx - r + left, cy - r + top, cx + r + left, cy + r + top


def test_fov_box_finds_an_off_centre_field_of_view_in_a_wide_black_border() -> None:
    f = fundus()
    left, top = 150, 20  # push the FOV right and down inside a larger black frame
    framed = np.pad(f.image, ((top, 60), (left, 10), (0, 0)))
    x0, y0, x1, y1 = fov_box(framed, PRE.fov_threshold)
    expected = true_box(f, left, top)
    factor = math.ceil(max(framed.shape[:2]) / 256)
    for found, want in zip((x0, y0, x1, y1), expected, strict=True):
        assert abs(found - want) <= factor + 2, ((x0, y0, x1, y1), expected)


def test_fov_box_ignores_sensor_noise_and_burned_in_text_in_the_border() -> None:
    f = fundus(seed=2)
    image = f.image.copy()
    noise = np.random.default_rng(0).normal(0, 6, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)  # noisy dark border, JPEG-like
    cv2.putText(image, "OD 45deg", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    x0, y0, x1, y1 = fov_box(image, PRE.fov_threshold)
    expected = true_box(f)
    assert max(abs(a - b) for a, b in zip((x0, y0, x1, y1), expected, strict=True)) <= 4


def test_fov_box_of_an_image_without_a_field_of_view_is_the_whole_image() -> None:
    assert fov_box(np.zeros((300, 400, 3), np.uint8), 20) == (0, 0, 400, 300)
    speck = np.zeros((300, 400, 3), np.uint8)
    speck[10:12, 10:12] = 255  # far too small to be a field of view
    assert fov_box(speck, 20) == (0, 0, 400, 300)


def test_prepare_gives_a_square_uint8_input_that_holds_the_whole_field_of_view() -> None:
    f = fundus(seed=3, width=640, height=480)
    out = prepare(f.image, PRE)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # The FOV circle touches all four sides and is not clipped: its area is that of the inscribed disc.
    box = fov_box(out, PRE.fov_threshold)
    assert max(abs(a - b) for a, b in zip(box, (0, 0, 224, 224), strict=True)) <= 2, box
    bright = np.count_nonzero(out.max(axis=2) > PRE.fov_threshold)
    assert bright == pytest.approx(math.pi / 4 * 224 * 224, rel=0.03)


def test_prepare_without_fov_crop_centres_a_wide_image_on_black_padding() -> None:
    image = np.full((256, 512, 3), 200, np.uint8)
    out = prepare(image, Preprocessing(input_size=128, fov_crop=False))
    assert out.shape == (128, 128, 3)
    assert (out[:32] == 0).all() and (out[96:] == 0).all()
    assert (out[32:96] == 200).all()


def test_large_photograph_is_shrunk_like_a_direct_area_resize() -> None:
    f = fundus(seed=4, width=2048, height=1536, columns=("DR", "MS"))
    out, geometry = prepare_with_geometry(f.image, PRE)
    x0, y0, x1, y1 = geometry.crop
    px0, py0, px1, py1 = geometry.placed
    direct = cv2.resize(f.image[y0:y1, x0:x1], (px1 - px0, py1 - py0), interpolation=cv2.INTER_AREA)
    assert np.abs(out[py0:py1, px0:px1].astype(int) - direct).mean() < 1.0
    # A DCT-scaled decode (1/8) of the same photograph gives nearly the same model input.
    small = np.asarray(cv2.resize(f.image, (256, 192), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    assert np.abs(prepare(small, PRE).astype(int) - out).mean() < 4.0


def point_heatmap(size: int, x: float, y: float, sigma: float = 1.5) -> NDArray[np.float32]:
    ys, xs = np.mgrid[0:size, 0:size]
    heat = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.asarray(heat, dtype=np.float32)


@pytest.mark.parametrize(("width", "height", "fov_crop"), [(700, 500, True), (480, 640, True), (600, 300, False)])
def test_a_point_on_the_model_input_maps_back_onto_its_place_in_the_photograph(
    width: int, height: int, fov_crop: bool
) -> None:
    f = render_fundus(np.random.default_rng(5), width, height, (), "L", mode="easy")
    image = f.image.copy()
    marker = (round(f.fov_centre[0] + 0.2 * f.fov_diameter), round(f.fov_centre[1] - 0.15 * f.fov_diameter))
    cv2.circle(image, marker, 3, (0, 0, 255), -1)
    pre = Preprocessing(input_size=160, fov_crop=fov_crop)
    out, geometry = prepare_with_geometry(image, pre)
    blue = out[..., 2].astype(int) - out[..., 0]
    my, mx = np.unravel_index(int(np.argmax(blue)), blue.shape)

    back = geometry.to_source(point_heatmap(160, float(mx), float(my)))
    assert back.shape == (height, width) and back.dtype == np.float32
    by, bx = np.unravel_index(int(np.argmax(back)), back.shape)
    scale = max(width, height) / 160
    assert math.dist((bx, by), marker) <= 1.5 * scale + 1

    # The same heatmap onto the photograph at twice the size (e.g. the full-size original of a
    # scaled decode) lands at twice the coordinates; outside the crop box it is zero.
    big = geometry.to_source(point_heatmap(160, float(mx), float(my)), (2 * height, 2 * width))
    by2, bx2 = np.unravel_index(int(np.argmax(big)), big.shape)
    assert math.dist((bx2, by2), (2 * marker[0], 2 * marker[1])) <= 3 * scale + 2
    x0, y0, x1, y1 = geometry.crop
    outside = np.ones(back.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert not back[outside].any()


@pytest.mark.parametrize(("width", "height", "fov_crop"), [(512, 384, True), (300, 500, False)])
def test_each_cell_of_a_coarse_cam_maps_back_onto_the_centre_of_its_patch(
    width: int, height: int, fov_crop: bool
) -> None:
    f = fundus(seed=6, width=width, height=height)
    _, geometry = prepare_with_geometry(f.image, Preprocessing(input_size=224, fov_crop=fov_crop))
    (x0, y0, x1, y1), (px0, py0, px1, py1) = geometry.crop, geometry.placed
    sx, sy = (x1 - x0) / (px1 - px0), (y1 - y0) / (py1 - py0)
    for row, column in ((1, 5), (3, 3), (5, 2)):
        cam = np.zeros((7, 7), np.float32)
        cam[row, column] = 1.0
        back = geometry.to_source(cam)
        y, x = np.unravel_index(int(np.argmax(back)), back.shape)
        # Centre of that cell on the model input, then through the inverse of resize and crop.
        mx, my = (column + 0.5) * 224 / 7, (row + 0.5) * 224 / 7
        expected = (x0 + (mx - px0) * sx - 0.5, y0 + (my - py0) * sy - 0.5)
        assert math.dist((x, y), expected) <= 1.0, (row, column)


def test_images_that_are_not_height_width_3_uint8_are_refused_naming_the_shape() -> None:
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.zeros((0, 64, 3), np.uint8)):
        with pytest.raises(ValueError, match=re_shape(bad.shape)):
            prepare(bad, PRE)
    with pytest.raises(ValueError, match="float32"):
        prepare(np.zeros((64, 64, 3), np.float32), PRE)
    with pytest.raises(ValueError, match=r"images\[1\].*\(64, 64\)"):
        prepare_batch([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)], PRE)


def re_shape(shape: tuple[int, ...]) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


def test_prepare_batch_stacks_the_same_pixels_as_prepare_for_mixed_sizes() -> None:
    images = [fundus(seed=7).image, fundus(seed=8, width=300, height=280).image, fundus(seed=9, width=1024).image]
    batch = prepare_batch(images, PRE)
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == np.uint8
    for row, image in zip(batch, images, strict=True):
        assert np.array_equal(row, prepare(image, PRE))
    assert prepare_batch([], PRE).shape == (0, 224, 224, 3)


def test_cell_to_source_finds_the_peak_of_the_mapped_heatmap_without_mapping_it() -> None:
    from retinagate.preprocess import Geometry

    rng = np.random.default_rng(3)
    geometries = [
        Geometry(source_shape=(768, 1024), crop=(130, 0, 898, 768), placed=(0, 0, 224, 224), size=224),
        Geometry(source_shape=(384, 512), crop=(64, 2, 450, 380), placed=(1, 0, 223, 224), size=224),
    ]
    # Stretched over the input, and on a receptive-field grid (one cell more, cells on pixel 32 k).
    geometries += [g.with_cam(CamGrid(origin=0.0, step=32.0)) for g in geometries]
    for geometry in geometries:
        for _ in range(50):
            cam = rng.random((7, 7) if geometry.cam is None else (8, 8)).astype(np.float32)
            cam *= geometry.visible_cells(cam.shape)  # as served: a peak off the photograph is never marked
            mapped = geometry.to_source(cam, (600, 800))
            row, column = np.unravel_index(int(np.argmax(cam)), cam.shape)

            x, y = geometry.cell_to_source((int(row), int(column)), cam.shape, (600, 800))

            # Within OpenCV's fixed-point interpolation (1/32 pixel) of the true peak, or on its plateau.
            assert mapped[y, x] == pytest.approx(mapped.max(), rel=5e-3)


def test_a_cam_grid_puts_cell_centres_where_it_says_and_the_mapped_map_peaks_there() -> None:
    from retinagate.preprocess import Geometry

    # A 640-pixel photograph cropped to its 480-pixel FOV, the input 288 pixels: 0.6 input px per photo px.
    geometry = Geometry(source_shape=(480, 640), crop=(80, 0, 560, 480), placed=(0, 0, 288, 288), size=288)
    stretched, aligned = geometry, geometry.with_cam(CamGrid(origin=0.0, step=32.0))

    xs, ys = aligned.cell_centres((10, 10))
    naive_xs, _ = stretched.cell_centres((9, 9))

    # Input edge 32 k -> photograph pixel centre 80 + 32 k / 0.6 - 0.5.
    np.testing.assert_allclose(xs, 80 + 32 * np.arange(10) / 0.6 - 0.5)
    np.testing.assert_allclose(ys, 32 * np.arange(10) / 0.6 - 0.5)
    np.testing.assert_allclose(naive_xs, 80 + (32 * np.arange(9) + 16) / 0.6 - 0.5)
    visible = aligned.visible_cells((10, 10))  # centres on [0, 288): the last row and column are off it
    assert visible[:9, :9].all() and not visible[9].any() and not visible[:, 9].any()
    one_hot = np.zeros((10, 10), np.float32)
    one_hot[4, 5] = 1.0
    mapped = aligned.to_source(one_hot)
    y, x = np.unravel_index(int(np.argmax(mapped)), mapped.shape)
    assert (x, y) == aligned.cell_to_source((4, 5), (10, 10)) == (round(xs[5]), round(ys[4])) == (346, 213)


def test_visible_cells_leave_out_the_padding() -> None:
    from retinagate.preprocess import Geometry

    wide = Geometry(source_shape=(768, 1024), crop=(0, 0, 1024, 768), placed=(0, 28, 224, 196), size=224)

    visible = wide.visible_cells((7, 7))

    assert visible[1:6].all() and not visible[0].any() and not visible[6].any()


def test_a_lesion_mask_goes_to_the_model_input_where_its_photograph_went() -> None:
    f = fundus(seed=4, width=640, height=480)
    photo = f.image.copy()
    cx, cy = (int(v) for v in f.fov_centre)
    photo[cy - 40 : cy - 30, cx + 50 : cx + 60] = (255, 255, 255)
    mask = np.zeros(photo.shape[:2], np.bool_)
    mask[cy - 40 : cy - 30, cx + 50 : cx + 60] = True
    prepared, geometry = prepare_with_geometry(photo, PRE)
    plane = geometry.to_input(mask)
    assert plane.shape == (224, 224) and plane.dtype == np.uint8
    white = prepared.min(axis=2) > 240
    assert plane[white].mean() > 200 and plane[~white].max() < 255
    assert geometry.to_input(np.zeros(photo.shape[:2], np.uint8)).max() == 0
    with pytest.raises(ValueError, match="photograph's"):
        geometry.to_input(mask[:-1])


def grey_border(image: NDArray[np.uint8], level: float, seed: int = 0) -> NDArray[np.uint8]:
    """The photograph with its black border lifted to ``level`` (plus sensor noise), as some cameras give."""
    from retinagate.preprocess import find_fov

    outside = 1.0 - find_fov(image, PRE.fov_threshold).coverage()[..., None]
    noise = np.random.default_rng(seed).normal(0.0, 3.0, image.shape)
    return np.clip(image + outside * (level + noise), 0, 255).astype(np.uint8)


def test_a_grey_border_raises_the_fov_threshold_just_above_it_and_the_crop_finds_the_retina_again() -> None:
    from retinagate.preprocess import FOV_BORDER_MARGIN, fit_fov_threshold

    photographs = [fundus(seed) for seed in range(6)]
    grey = [grey_border(f.image, 40, seed) for seed, f in enumerate(photographs)]
    whole = (0, 0, grey[0].shape[1], grey[0].shape[0])
    assert fov_box(grey[0], PRE.fov_threshold) == whole  # the default takes the grey border for retina

    fit = fit_fov_threshold(grey)
    assert fit.moved and fit.measured == fit.bordered == 6
    assert fit.border is not None and fit.retina is not None
    assert 40 <= fit.border < 46 and fit.threshold == math.ceil(fit.border + FOV_BORDER_MARGIN) < fit.retina
    assert f"raised from 20 to {fit.threshold}" in fit.describe()
    for f, image in zip(photographs, grey, strict=True):
        found = fov_box(image, fit.threshold)
        # The threshold also trims the retina's dimmest rim, by a few pixels.
        assert max(abs(a - b) for a, b in zip(found, true_box(f), strict=True)) <= 12, (found, true_box(f))


def test_black_borders_text_and_edge_to_edge_retinas_keep_the_default_fov_threshold() -> None:
    from retinagate.preprocess import fit_fov_threshold

    photographs = [fundus(seed).image.copy() for seed in range(4)]
    for image in photographs[:2]:  # burned-in text in two corners
        cv2.putText(image, "OD", (2, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 2)
        cv2.putText(image, "45", (480, 380), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 2)
    inside = [image[142:242, 206:306].copy() for image in photographs]  # retina from edge to edge
    fit = fit_fov_threshold(photographs + inside)
    assert not fit.moved and fit.threshold == 20
    assert fit.measured == 8 and fit.bordered == 4 and fit.border is not None and fit.border < 4
    assert fit.describe().startswith("FOV threshold 20: borders of 4 of 8 training photographs")

    nothing = fit_fov_threshold(inside)
    assert nothing.threshold == 20 and nothing.bordered == 0 and nothing.border is None
    assert "none of 4 training photographs has a border" in nothing.describe()


def test_borders_as_bright_as_some_retinas_keep_the_default_fov_threshold() -> None:
    from retinagate.preprocess import fit_fov_threshold

    # Grey borders on some photographs, dark retinas on others: no one level parts all borders from all retinas.
    grey = [grey_border(fundus(seed).image, 40, seed) for seed in range(3)]
    dark = [(fundus(seed).image * 0.4).astype(np.uint8) for seed in range(3, 6)]
    fit = fit_fov_threshold(grey + dark)
    assert fit.bordered == 6 and fit.border is not None and fit.retina is not None
    assert fit.border + 8 >= fit.retina and fit.threshold == 20
    assert "though no level parts border from retina" in fit.describe()
