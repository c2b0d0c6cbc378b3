"""Tests for retinagate.outputs.render: the heatmap picture and its legend."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from retinagate.card import Preprocessing
from retinagate.outputs.render import HeatmapFinding, Legend, display_shape, render_heatmaps, retina_heat
from retinagate.preprocess import find_fov, prepare_with_geometry
from retinagate.synth import render_fundus

LEGEND = Legend(model="fundus-net 1.0", lines=("Findings: DR 0.91",))


@pytest.fixture(scope="module")
def photo() -> NDArray[np.uint8]:
    return render_fundus(np.random.default_rng(3), 512, 384, ()).image


def _cam_peaked_at(row: int, column: int) -> NDArray[np.float32]:
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[row, column] = 4.0
    return cam


def test_the_heatmap_is_drawn_where_the_cam_points(photo: NDArray[np.uint8]) -> None:
    _, geometry = prepare_with_geometry(photo, Preprocessing(input_size=224))

    picture = render_heatmaps(photo, geometry, [HeatmapFinding("DR", 0.91, _cam_peaked_at(1, 5))], LEGEND,
                              long_side=1024)  # fmt: skip

    height, width = display_shape(photo.shape[:2], 1024)
    plain = render_heatmaps(photo, geometry, [], LEGEND, long_side=1024)[:height]
    changed = np.abs(picture[:height].astype(int) - plain.astype(int)).sum(axis=2) > 30
    rows, columns = np.nonzero(changed)
    # CAM cell (1, 5) of 7 covers the upper right of the model input, hence of the photograph.
    assert changed.any()
    assert rows.mean() < height * 0.45 and columns.mean() > width * 0.55
    assert not changed[height * 3 // 4 :, : width // 4].any()


def test_the_picture_is_display_size_with_a_legend_panel_below(photo: NDArray[np.uint8]) -> None:
    _, geometry = prepare_with_geometry(photo, Preprocessing(input_size=224))

    picture = render_heatmaps(photo, geometry, [], LEGEND, long_side=800)

    assert picture.shape[1] == 800 and picture.shape[0] > 600 and picture.dtype == np.uint8
    panel = picture[600:]
    assert (panel > 100).any()  # the legend text is burned in
    assert display_shape((384, 512), 800) == (600, 800)


def test_a_cam_with_no_activation_draws_no_heatmap(photo: NDArray[np.uint8]) -> None:
    _, geometry = prepare_with_geometry(photo, Preprocessing(input_size=224))
    empty = HeatmapFinding("DR", 0.91, np.zeros((7, 7), dtype=np.float32))

    assert np.array_equal(
        render_heatmaps(photo, geometry, [empty], LEGEND), render_heatmaps(photo, geometry, [], LEGEND)
    )


def test_a_frame_that_is_not_rgb_is_refused(photo: NDArray[np.uint8]) -> None:
    _, geometry = prepare_with_geometry(photo, Preprocessing(input_size=224))
    with pytest.raises(ValueError, match="frame"):
        render_heatmaps(photo[:, :, 0], geometry, [], LEGEND)


def test_heat_is_drawn_on_the_retina_only_even_when_the_strongest_cell_is_in_a_black_corner(
    photo: NDArray[np.uint8],
) -> None:
    fov = find_fov(photo)
    _, geometry = prepare_with_geometry(photo, Preprocessing(input_size=224), fov=fov)
    cam = _cam_peaked_at(0, 0) + 0.5 * _cam_peaked_at(3, 2)  # the corner cell is strongest, off the retina

    mapped = retina_heat(cam, geometry, photo.shape[:2], fov)
    picture = render_heatmaps(photo, geometry, [HeatmapFinding("DR", 0.9, cam)], LEGEND, long_side=512, fov=fov)

    assert mapped is not None
    heat, cell = mapped
    assert cell == (3, 2)  # the marker goes to the strongest cell on the retina
    outside = fov.coverage() == 0.0
    assert heat[outside].max() == 0.0 and heat.max() > 0.9
    height = photo.shape[0]
    border = (photo.max(axis=2) == 0) & outside  # the black corners stay black
    assert picture[:height][border].max() == 0


def test_a_map_shown_for_context_is_drawn_but_not_marked(photo: NDArray[np.uint8]) -> None:
    fov = find_fov(photo)
    _, geometry = prepare_with_geometry(photo, Preprocessing(input_size=224), fov=fov)
    cam = _cam_peaked_at(3, 3)
    height, _ = display_shape(photo.shape[:2], 512)

    plain = render_heatmaps(photo, geometry, [], LEGEND, long_side=512, fov=fov)
    marked = render_heatmaps(photo, geometry, [HeatmapFinding("DR", 0.9, cam)], LEGEND, long_side=512, fov=fov)
    context = render_heatmaps(photo, geometry, [HeatmapFinding("Disease_Risk", 0.2, cam, marked=False)], LEGEND,
                              long_side=512, fov=fov)  # fmt: skip

    assert not np.array_equal(context[:height], plain[:height])  # the heat is there
    marker = np.abs(marked[:height].astype(int) - context[:height].astype(int)).sum(axis=2) > 60
    assert 20 < marker.sum() < 0.05 * marker.size  # the same heat; only the marked one has a ring and a name
