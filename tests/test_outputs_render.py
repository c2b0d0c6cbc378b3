"""Tests for retinagate.outputs.render: the heatmap picture and its legend."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from retinagate.card import Preprocessing
from retinagate.outputs.render import HeatmapFinding, Legend, display_shape, render_heatmaps
from retinagate.preprocess import prepare_with_geometry
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
