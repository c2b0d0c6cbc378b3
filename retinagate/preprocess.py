"""Turns a fundus photograph into model input: FOV crop, centred square, resize.

Training and serving both call :func:`prepare`, so the model sees the same pixels in both. The recipe
comes from the model card (:class:`retinagate.card.Preprocessing`): find the bounding box of the circular
field of view (FOV), crop to it, centre it on a black square and resize to ``input_size`` with area
interpolation.

The crop is resized straight into its place on the black square instead of padding first and resizing
the padded copy: the pixels are the same up to rounding at the border, and a 12-megapixel photograph
never gets copied into a larger padded buffer. :class:`Geometry` records where the crop went, so a
heatmap computed on the model input maps back onto the photograph (:meth:`Geometry.to_source`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from retinagate.card import CamGrid, Preprocessing

__all__ = [
    "FOV_BORDER_MARGIN",
    "FieldOfView",
    "FovThresholdFit",
    "Geometry",
    "border_and_retina",
    "find_fov",
    "fit_fov_threshold",
    "fov_box",
    "prepare",
    "prepare_batch",
    "prepare_with_geometry",
]

#: Longest side of the thumbnail the FOV search runs on; enough to place the box within a pixel or two
#: of the full image after scaling back, and cheap (about 0.1 ms for the connected components).
_FOV_SEARCH_SIDE = 256

#: The FOV must cover at least this share of the image to count; smaller bright blobs (burned-in text,
#: a noisy border) are ignored and the whole image is used instead.
_FOV_MIN_AREA = 0.02

Box = tuple[int, int, int, int]


def _check_image(image: NDArray[np.uint8], name: str = "image") -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} has shape {image.shape}; expected (height, width, 3) RGB")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {image.dtype}; expected uint8")


@dataclass(frozen=True)
class FieldOfView:
    """What the FOV search found: the box, and the region itself on the search thumbnail.

    Attributes:
        box: ``(x0, y0, x1, y1)`` bounding box in the photograph (exclusive ends); the whole image
            when no FOV was found.
        mask: The FOV region on the thumbnail (``True`` inside), or ``None`` when none was found.
            The gradability gate (:mod:`retinagate.gate`) checks its shape.
        factor: Photograph pixels per thumbnail pixel along each axis.
        thumbnail: The area-averaged ``(h, w, 3)`` thumbnail the search ran on.
    """

    box: Box
    mask: NDArray[np.bool_] | None
    factor: int
    thumbnail: NDArray[np.uint8]
    source_shape: tuple[int, int]

    @property
    def found(self) -> bool:
        """Whether a bright region large enough to be a field of view was found."""
        return self.mask is not None

    def contains(self, x: NDArray[np.floating], y: NDArray[np.floating]) -> NDArray[np.bool_]:
        """Whether photograph pixels ``(x, y)`` lie in the field of view (all do when none was found)."""
        xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if self.mask is None:
            return np.ones(np.broadcast_shapes(xs.shape, ys.shape), dtype=bool)
        rows = np.clip(ys // self.factor, 0, self.mask.shape[0] - 1).astype(np.intp)
        columns = np.clip(xs // self.factor, 0, self.mask.shape[1] - 1).astype(np.intp)
        inside: NDArray[np.bool_] = self.mask[rows, columns]
        return inside

    def coverage(self, shape: tuple[int, int] | None = None) -> NDArray[np.float32]:
        """The field of view as a 0-1 map: 1 inside, 0 outside, with a soft edge one thumbnail pixel wide.

        Args:
            shape: ``(height, width)`` of the map; the photograph at another scale (the display
                picture, a coarse heat grid). Defaults to the photograph's own shape.

        Returns:
            ``float32`` map of ``shape``; all ones when no field of view was found (nothing to
            mask: the whole image was used).
        """
        height, width = self.source_shape if shape is None else shape
        if self.mask is None:
            return np.ones((height, width), dtype=np.float32)
        # Target pixel centre -> photograph -> thumbnail pixel (thumbnail pixel i covers the
        # photograph's [i * factor, (i + 1) * factor)); rows past the thumbnail repeat its edge.
        ax = self.source_shape[1] / (width * self.factor)
        ay = self.source_shape[0] / (height * self.factor)
        matrix = np.array([[ax, 0.0, 0.5 * ax - 0.5], [0.0, ay, 0.5 * ay - 0.5]], dtype=np.float64)
        out = cv2.warpAffine(
            self.mask.astype(np.float32),
            matrix,
            (width, height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return np.asarray(out, dtype=np.float32)


def _thumbnail(image: NDArray[np.uint8]) -> tuple[NDArray[np.uint8], int]:
    """The area-averaged thumbnail the FOV search runs on, and photograph pixels per thumbnail pixel."""
    height, width = image.shape[:2]
    factor = max(1, math.ceil(max(height, width) / _FOV_SEARCH_SIDE))
    if factor == 1:
        return image, 1
    small_w, small_h = max(1, width // factor), max(1, height // factor)
    # Sample every (factor/2)-th pixel, then average 2 x 2: a quarter of the cost of averaging
    # every pixel, and still enough averaging to keep border noise below the threshold.
    stride = max(1, factor // 2)
    sampled = image[: small_h * factor : stride, : small_w * factor : stride]
    return np.asarray(cv2.resize(sampled, (small_w, small_h), interpolation=cv2.INTER_AREA), dtype=np.uint8), factor


def _brightest(small: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Each pixel's brightest channel (20x faster than ``max(axis=2)``)."""
    return np.maximum(np.maximum(small[..., 0], small[..., 1]), small[..., 2])


def find_fov(image: NDArray[np.uint8], threshold: int = 20) -> FieldOfView:
    """Finds the circular field of view: the largest bright region of an area-averaged thumbnail.

    The search runs on an area-averaged thumbnail (which also averages out sensor and JPEG noise in
    the black border) and keeps the largest connected region brighter than ``threshold`` in its
    brightest channel. The brightest channel rather than red alone keeps red-free (green) photographs
    working; on colour fundus photographs red is the brightest channel anyway.

    Args:
        image: ``(H, W, 3)`` uint8 RGB photograph.
        threshold: Level (0-255) that separates the FOV from the dark border.

    Returns:
        The :class:`FieldOfView`; its box is the whole image when no FOV is found.

    Raises:
        ValueError: If the image is not ``(H, W, 3)`` uint8 or the threshold is outside 0-255.
    """
    _check_image(image)
    if not 0 <= threshold <= 255:
        raise ValueError(f"threshold is {threshold}; expected 0-255")
    height, width = image.shape[:2]
    small, factor = _thumbnail(image)
    small_h, small_w = small.shape[:2]
    whole = FieldOfView((0, 0, width, height), None, factor, small, (height, width))
    mask = (_brightest(small) > threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return whole
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = 1 + int(np.argmax(areas))
    if stats[best, cv2.CC_STAT_AREA] < _FOV_MIN_AREA * small_w * small_h:
        return whole
    left, top = int(stats[best, cv2.CC_STAT_LEFT]), int(stats[best, cv2.CC_STAT_TOP])
    right = left + int(stats[best, cv2.CC_STAT_WIDTH])
    bottom = top + int(stats[best, cv2.CC_STAT_HEIGHT])
    # Thumbnail cells that touch the image edge also own the remainder rows/columns that were cut off.
    x1 = width if right >= small_w else min(width, right * factor)
    y1 = height if bottom >= small_h else min(height, bottom * factor)
    # The region with its holes filled: a dark lesion inside the FOV is still inside it.
    region = np.zeros((small_h, small_w), dtype=np.uint8)
    contours, _ = cv2.findContours((labels == best).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(region, contours, -1, 1, thickness=cv2.FILLED)
    return FieldOfView((left * factor, top * factor, x1, y1), region.astype(bool), factor, small, (height, width))


def fov_box(image: NDArray[np.uint8], threshold: int = 20) -> Box:
    """Finds the bounding box of the circular field of view (see :func:`find_fov`).

    Args:
        image: ``(H, W, 3)`` uint8 RGB photograph.
        threshold: Level (0-255) that separates the FOV from the dark border.

    Returns:
        ``(x0, y0, x1, y1)`` with exclusive ``x1``/``y1``; the whole image when no FOV is found.

    Raises:
        ValueError: If the image is not ``(H, W, 3)`` uint8 or the threshold is outside 0-255.
    """
    return find_fov(image, threshold).box


#: An automatic FOV threshold sits this many levels above the brightest border of the training
#: photographs (thumbnail levels are area averages, so the border's sensor noise has mostly gone).
FOV_BORDER_MARGIN = 8

#: The share of the thumbnail's shorter side that each corner sample spans, and the central disc's
#: radius as a share of it; a circular field of view of any size from the sensor's height to its
#: width leaves the corners dark and fills the central disc.
_CORNER_SHARE, _CENTRE_SHARE = 0.06, 0.3


def border_and_retina(image: NDArray[np.uint8]) -> tuple[float, float]:
    """How bright a photograph's border and its retina are, on the FOV search's thumbnail.

    The border is the second-darkest of the four corners (each corner's 90th percentile), so burned-in
    text in up to two corners does not count; the retina is the 5th percentile of a central disc.
    Both are levels of each pixel's brightest channel, as :func:`find_fov` thresholds them.
    """
    _check_image(image)
    brightest = _brightest(_thumbnail(image)[0])
    height, width = brightest.shape
    k = max(2, round(_CORNER_SHARE * min(height, width)))
    corners = sorted(
        float(np.percentile(corner, 90))
        for corner in (brightest[:k, :k], brightest[:k, -k:], brightest[-k:, :k], brightest[-k:, -k:])
    )
    ys, xs = np.ogrid[:height, :width]
    disc = (ys - (height - 1) / 2) ** 2 + (xs - (width - 1) / 2) ** 2 <= (_CENTRE_SHARE * min(height, width)) ** 2
    return corners[1], float(np.percentile(brightest[disc], 5))


@dataclass(frozen=True)
class FovThresholdFit:
    """The FOV threshold chosen for a camera's photographs (:func:`fit_fov_threshold`).

    Attributes:
        threshold: The level to use (``card.preprocessing.fov_threshold``).
        default: The level it started from.
        measured: Photographs measured.
        bordered: Of those, photographs whose corners are clearly darker than their retina (at most
            half its level); photographs filled edge to edge by the retina say nothing of the border.
        border: The brightest border among them (98th percentile), or ``None`` when none has one.
        retina: Their darkest central retina (5th percentile), or ``None``.
    """

    threshold: int
    default: int
    measured: int
    bordered: int
    border: float | None
    retina: float | None

    @property
    def moved(self) -> bool:
        return self.threshold != self.default

    def describe(self) -> str:
        """One line for the training log."""
        if self.border is None or self.retina is None:
            return (
                f"FOV threshold {self.threshold}: none of {self.measured} training photographs has a border "
                "darker than its retina"
            )
        levels = (
            f"borders of {self.bordered} of {self.measured} training photographs up to {self.border:.0f}, "
            f"their central retina from {self.retina:.0f}"
        )
        if self.moved:
            return f"FOV threshold raised from {self.default} to {self.threshold}: {levels}"
        if self.border + FOV_BORDER_MARGIN >= self.retina:
            return f"FOV threshold {self.threshold}, though no level parts border from retina: {levels}"
        return f"FOV threshold {self.threshold}: {levels}"


def fit_fov_threshold(images: Iterable[NDArray[np.uint8]], default: int = 20) -> FovThresholdFit:
    """Chooses the FOV threshold for a camera from its photographs.

    The default (20) separates a black border from the retina. A camera or generator whose border is
    grey (a lifted black level, a lens flare, a dark-grey mask) would have its whole frame taken for
    the field of view at 20: no crop, and every photograph "no circular field of view" at the gate.
    Then the threshold is raised to :data:`FOV_BORDER_MARGIN` levels above the brightest border
    (the 98th percentile over the photographs), the least that clears it, so the dim rim of the
    retina stays in. It is never lowered. It stays at the default while the default clears the
    brightest border by half the margin, when the border would reach the central retina (no level
    parts them), and when no photograph has a border at all.

    Args:
        images: ``(H, W, 3)`` uint8 RGB photographs of the camera (a few dozen are plenty).
        default: The threshold kept when nothing calls for another.
    """
    borders, retinas = [], []
    measured = 0
    for image in images:
        measured += 1
        border, retina = border_and_retina(image)
        if border <= 0.5 * retina:
            borders.append(border)
            retinas.append(retina)
    if not borders:
        return FovThresholdFit(default, default, measured, 0, None, None)
    border = float(np.percentile(borders, 98))
    retina = float(np.percentile(retinas, 5))
    needed = math.ceil(border + FOV_BORDER_MARGIN)
    clears = border + FOV_BORDER_MARGIN / 2 <= default
    threshold = default if clears or needed >= retina else needed
    return FovThresholdFit(threshold, default, measured, len(borders), border, retina)


@dataclass(frozen=True)
class Geometry:
    """Where the cropped photograph sits inside the model input.

    Attributes:
        source_shape: ``(height, width)`` of the photograph that was prepared.
        crop: ``(x0, y0, x1, y1)`` crop box in that photograph (exclusive ends).
        placed: ``(x0, y0, x1, y1)`` box the resized crop occupies in the ``size`` x ``size`` input;
            everything outside it is black padding.
        size: Side of the square model input.
        cam: Where the cells of a class activation map sit on the model input
            (:meth:`retinagate.card.ModelCard.cam_grid`); ``None``: a map given to the methods below
            is stretched over the input edge to edge, whatever its resolution.
    """

    source_shape: tuple[int, int]
    crop: Box
    placed: Box
    size: int
    cam: CamGrid | None = None

    def with_cam(self, cam: CamGrid | None) -> Geometry:
        """This geometry, with maps read on the ``cam`` grid."""
        return replace(self, cam=cam)

    def _grid(self, cells: int) -> CamGrid:
        return CamGrid.covering(self.size, cells) if self.cam is None else self.cam

    def _centres(self, cells: int) -> NDArray[np.float64]:
        """Model-input coordinates of the centres of ``cells`` cells along one axis."""
        grid = self._grid(cells)
        return grid.origin + grid.step * np.arange(cells, dtype=np.float64)

    def to_source(
        self, heatmap: NDArray[np.floating], source_shape: tuple[int, int] | None = None
    ) -> NDArray[np.float32]:
        """Maps a heatmap on the model input back onto the photograph.

        The inverse of crop + pad + resize: the part of the heatmap that covers the photograph is
        resized into the crop box of a zero map of the photograph's size; the padding is dropped.

        Args:
            heatmap: ``(h, w)`` map over the model input: a CAM on the :attr:`cam` grid, or, without
                one, a map of any resolution (a CAM at 9 x 9 or a ``size`` x ``size`` map) stretched
                over the input square edge to edge.
            source_shape: ``(height, width)`` to map onto; defaults to the prepared photograph's
                shape. A different shape is treated as the same photograph at another scale (for
                example the full-size photograph when the model input came from a DCT-scaled
                decode), and the crop box scales with it.

        Returns:
            ``float32`` map of ``source_shape``, zero outside the crop box.

        Raises:
            ValueError: If the heatmap is not 2-D or the target shape is not positive.
        """
        heat = np.asarray(heatmap)
        if heat.ndim != 2 or heat.shape[0] < 1 or heat.shape[1] < 1:
            raise ValueError(f"heatmap has shape {heat.shape}; expected a non-empty (height, width) map")
        target_h, target_w = self.source_shape if source_shape is None else source_shape
        if target_h < 1 or target_w < 1:
            raise ValueError(f"source_shape is {(target_h, target_w)}; expected positive sizes")
        src_h, src_w = self.source_shape
        sx, sy = target_w / src_w, target_h / src_h
        x0, y0, x1, y1 = self.crop
        tx0, ty0 = round(x0 * sx), round(y0 * sy)
        tx1, ty1 = max(tx0 + 1, min(target_w, round(x1 * sx))), max(ty0 + 1, min(target_h, round(y1 * sy)))
        out = np.zeros((target_h, target_w), dtype=np.float32)
        # Heatmap cell u (centre at origin + u * step on the model input) -> crop -> source -> target
        # scale, then shifted into the crop box; pixel v of the result is centred at v + 0.5.
        hh, hw = heat.shape
        gx, gy = self._grid(hw), self._grid(hh)
        px0, py0, px1, py1 = self.placed
        scale_x, scale_y = (x1 - x0) / (px1 - px0), (y1 - y0) / (py1 - py0)
        ax, ay = gx.step * scale_x * sx, gy.step * scale_y * sy
        cx = (gx.origin - px0) * scale_x * sx + x0 * sx - tx0 - 0.5
        cy = (gy.origin - py0) * scale_y * sy + y0 * sy - ty0 - 0.5
        matrix = np.array([[ax, 0.0, cx], [0.0, ay, cy]], dtype=np.float64)
        region = cv2.warpAffine(
            np.ascontiguousarray(heat, dtype=np.float32),
            matrix,
            (tx1 - tx0, ty1 - ty0),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        out[ty0:ty1, tx0:tx1] = region
        return out

    def to_input(self, plane: NDArray[np.bool_] | NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Carries a plane over the photograph (a lesion mask) to the model input, as the photograph went.

        The same crop and pad as :func:`prepare`; the crop is resized with area interpolation, so a
        pixel of the result holds the share of it the plane covered (0 to 255), and a lesion smaller
        than an input pixel survives as a faint pixel instead of vanishing.

        Raises:
            ValueError: If the plane does not have the photograph's ``(height, width)``.
        """
        if plane.shape != self.source_shape:
            raise ValueError(f"plane has shape {plane.shape}; expected the photograph's {self.source_shape}")
        x0, y0, x1, y1 = self.crop
        px0, py0, px1, py1 = self.placed
        region = np.asarray(plane[y0:y1, x0:x1], dtype=np.float32)
        if plane.dtype == np.bool_:
            region *= 255.0
        resized = _resize(region, px1 - px0, py1 - py0)
        out = np.zeros((self.size, self.size), dtype=np.uint8)
        out[py0:py1, px0:px1] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
        return out

    def visible_cells(self, heat_shape: tuple[int, int]) -> NDArray[np.bool_]:
        """Which cells of a heatmap over the model input have their centre on the photograph (not padding)."""
        h, w = heat_shape
        px0, py0, px1, py1 = self.placed
        xs, ys = self._centres(w), self._centres(h)
        return ((ys >= py0) & (ys < py1))[:, None] & ((xs >= px0) & (xs < px1))[None, :]

    def cell_centres(
        self, heat_shape: tuple[int, int], source_shape: tuple[int, int] | None = None
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Where the centre of every cell of a heatmap over the model input lands on the photograph.

        Args:
            heat_shape: ``(h, w)`` of the heatmap (on the :attr:`cam` grid, or edge to edge).
            source_shape: As for :meth:`to_source`.

        Returns:
            ``x`` of each column (``w`` values) and ``y`` of each row (``h`` values), in pixel
            coordinates of ``source_shape`` (pixel centres at integers), not clamped.
        """
        target_h, target_w = self.source_shape if source_shape is None else source_shape
        sx, sy = target_w / self.source_shape[1], target_h / self.source_shape[0]
        x0, y0, x1, y1 = self.crop
        px0, py0, px1, py1 = self.placed
        scale_x, scale_y = (x1 - x0) / (px1 - px0), (y1 - y0) / (py1 - py0)
        columns, rows = self._centres(heat_shape[1]), self._centres(heat_shape[0])
        # Cell centre on the model input -> crop -> photograph -> target scale (pixel centres at +0.5).
        xs = (columns - px0) * scale_x * sx + x0 * sx - 0.5
        ys = (rows - py0) * scale_y * sy + y0 * sy - 0.5
        return xs, ys

    def cell_to_source(
        self, cell: tuple[int, int], heat_shape: tuple[int, int], source_shape: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """Where the centre of one heatmap cell lands on the photograph, as :meth:`to_source` maps it.

        A bilinear map peaks at a grid node, so the peak of :meth:`to_source`'s output is the
        image of the heatmap's strongest cell: this finds it without mapping the whole map.

        Args:
            cell: ``(row, column)`` of the cell in a heatmap of ``heat_shape``.
            heat_shape: ``(h, w)`` of that heatmap (on the :attr:`cam` grid, or edge to edge).
            source_shape: As for :meth:`to_source`.

        Returns:
            ``(x, y)`` pixel in ``source_shape``, clamped to the crop box.
        """
        target_h, target_w = self.source_shape if source_shape is None else source_shape
        sx, sy = target_w / self.source_shape[1], target_h / self.source_shape[0]
        x0, y0, x1, y1 = self.crop
        xs, ys = self.cell_centres(heat_shape, source_shape)
        row, column = cell
        x, y = float(xs[column]), float(ys[row])
        clamp_x = (round(x0 * sx), max(round(x0 * sx), min(target_w, round(x1 * sx)) - 1))
        clamp_y = (round(y0 * sy), max(round(y0 * sy), min(target_h, round(y1 * sy)) - 1))
        return min(max(round(x), clamp_x[0]), clamp_x[1]), min(max(round(y), clamp_y[0]), clamp_y[1])


def _layout(crop_w: int, crop_h: int, size: int) -> Box:
    """Box of the resized crop, centred in the ``size`` square (the pad-to-square step)."""
    side = max(crop_w, crop_h)
    new_w = max(1, min(size, round(crop_w * size / side)))
    new_h = max(1, min(size, round(crop_h * size / side)))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    return left, top, left + new_w, top + new_h


def _align(start: int, end: int, multiple: int, limit: int) -> tuple[int, int]:
    """Grows ``[start, end)`` inside ``[0, limit)`` to a length divisible by ``multiple``.

    Grows into the (black) border rather than cutting the FOV; trims only when the span already
    fills the image edge to edge.
    """
    remainder = (end - start) % multiple
    if remainder == 0:
        return start, end
    grow = multiple - remainder
    right = min(grow, limit - end)
    left = min(grow - right, start)
    if left + right == grow:
        return start - left, end + right
    return start, end - remainder


def _resize(region: NDArray[Any], width: int, height: int) -> NDArray[Any]:
    """Area interpolation when shrinking (it averages instead of skipping pixels, so small lesions
    survive), bilinear when enlarging."""
    shrinking = width <= region.shape[1] and height <= region.shape[0]
    return np.asarray(
        cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    )


def _halvings(crop_w: int, crop_h: int, placed_w: int, placed_h: int) -> int:
    """How many exact 2x area reductions still leave at least the target size."""
    count = 0
    while (crop_w >> (count + 1)) >= placed_w and (crop_h >> (count + 1)) >= placed_h:
        count += 1
    return count


def _prepare_into(
    image: NDArray[np.uint8], preprocessing: Preprocessing, out: NDArray[np.uint8], fov: FieldOfView | None = None
) -> Geometry:
    _check_image(image)
    height, width = image.shape[:2]
    size = preprocessing.input_size
    if not preprocessing.fov_crop:
        x0, y0, x1, y1 = 0, 0, width, height
    else:
        x0, y0, x1, y1 = (fov if fov is not None else find_fov(image, preprocessing.fov_threshold)).box
    placed = _layout(x1 - x0, y1 - y0, size)
    halvings = _halvings(x1 - x0, y1 - y0, placed[2] - placed[0], placed[3] - placed[1])
    if halvings:
        # OpenCV's 2x area reduction is several times faster than a general area resize (0.5 ms vs
        # 8 ms for a 12 MP crop), so shrink by exact halvings first and finish with one small area
        # resize. Halvings need even sides, hence the crop grows to a multiple of 2**halvings.
        x0, x1 = _align(x0, x1, 1 << halvings, width)
        y0, y1 = _align(y0, y1, 1 << halvings, height)
        placed = _layout(x1 - x0, y1 - y0, size)
    px0, py0, px1, py1 = placed
    region: NDArray[np.uint8] = image[y0:y1, x0:x1]
    for _ in range(halvings):
        half_w, half_h = region.shape[1] // 2, region.shape[0] // 2
        if half_w < px1 - px0 or half_h < py1 - py0:
            break
        region = np.asarray(cv2.resize(region, (half_w, half_h), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    out[...] = 0
    out[py0:py1, px0:px1] = _resize(region, px1 - px0, py1 - py0)
    return Geometry(source_shape=(height, width), crop=(x0, y0, x1, y1), placed=placed, size=size)


def prepare_with_geometry(
    image: NDArray[np.uint8], preprocessing: Preprocessing, *, fov: FieldOfView | None = None
) -> tuple[NDArray[np.uint8], Geometry]:
    """Prepares one photograph and says where it went, for mapping heatmaps back.

    Args:
        image: ``(H, W, 3)`` uint8 RGB photograph.
        preprocessing: The model card's preprocessing recipe.
        fov: The result of :func:`find_fov` on this image with the card's threshold, when the caller
            already has it (the gradability gate does); searched here otherwise.

    Returns:
        The ``(S, S, 3)`` uint8 model input (``S = preprocessing.input_size``) and its :class:`Geometry`.

    Raises:
        ValueError: If the image is not ``(H, W, 3)`` uint8.
    """
    size = preprocessing.input_size
    out = np.empty((size, size, 3), dtype=np.uint8)
    geometry = _prepare_into(image, preprocessing, out, fov)
    return out, geometry


def prepare(image: NDArray[np.uint8], preprocessing: Preprocessing) -> NDArray[np.uint8]:
    """Crops a photograph to its field of view, centres it on a black square and resizes it.

    Area interpolation when shrinking (it averages instead of skipping pixels, so small lesions
    survive), bilinear when enlarging.

    Args:
        image: ``(H, W, 3)`` uint8 RGB photograph.
        preprocessing: The model card's preprocessing recipe.

    Returns:
        ``(S, S, 3)`` uint8 RGB with ``S = preprocessing.input_size``.

    Raises:
        ValueError: If the image is not ``(H, W, 3)`` uint8.
    """
    return prepare_with_geometry(image, preprocessing)[0]


def prepare_batch(images: Sequence[NDArray[np.uint8]], preprocessing: Preprocessing) -> NDArray[np.uint8]:
    """Prepares several photographs (of any sizes) into one ``(N, S, S, 3)`` uint8 batch.

    Raises:
        ValueError: If any image is not ``(H, W, 3)`` uint8; the message names its position.
    """
    size = preprocessing.input_size
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        try:
            _prepare_into(image, preprocessing, batch[index])
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"images[{index}]: {exc}") from None
    return batch
