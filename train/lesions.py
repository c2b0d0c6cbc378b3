"""Lesion masks as training targets: where on the CAM each positive label's evidence should sit.

The classification loss says only whether a label is present; a network trained from it alone on a
few hundred photographs learns to find a lesion's evidence, but not to keep it in the lesion's own
cells (README, Model: the maps' peaks sat a cell or more from small lesions). Where the data has lesion
masks (``retinagate synth`` writes them; public sets such as IDRiD, FGADR and DDR publish lesion
segmentations of real photographs in the same one-file-per-lesion-type form),
``--lesion-loss W`` asks each positive label's class map to put its mass on its lesion
(:func:`train.losses.lesion_loss`), and ``--probe-loss W`` teaches a probe on each stage of
``--probe-strides``, cell by cell, where each label's lesions are (:class:`train.model.LesionProbe`).
Masks shape training only: the served head is still average pooling and one linear layer, so the
exported CAM stays exactly Grad-CAM, and a model trained without masks (real RFMiD has none) is trained
exactly as before.

:func:`lesion_planes` carries each training photograph's masks to the model input once, through the
photograph's own crop and resize (:meth:`retinagate.preprocess.Geometry.to_input`), and stores them
next to the image cache; the loader moves them with every augmentation of the photograph. A finding
seen over the retina as a whole (media haze, tessellation: :data:`retinagate.labels.DIFFUSE_LABELS`) gets
no mask in a set annotated by lesion; where such a set has masks for other findings, a positive diffuse
finding without one is taken to cover the field of view, so the probes learn its texture cell by cell
instead of nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from retinagate.card import Preprocessing
from retinagate.labels import DISEASE_LABELS, LABELS
from retinagate.preprocess import find_fov, prepare_with_geometry
from train.datasets import SplitSource, cache_key, read_image
from train.loader import LesionPlanes
from train.masks import MaskIndex, read_lesion_mask

__all__ = ["MAX_PAIRS_PER_IMAGE", "lesion_planes"]

logger = logging.getLogger(__name__)

#: Lesion planes handed out per photograph; a photograph with more labelled lesion types (rare) trains
#: on its first eight. Eight 288 px planes are 0.66 MB a photograph in a batch.
MAX_PAIRS_PER_IMAGE: Final = 8

_FORMAT: Final = 1


def lesion_planes(
    source: SplitSource,
    preprocessing: Preprocessing,
    masks: MaskIndex,
    cache_dir: Path,
    *,
    labels: Sequence[str] = DISEASE_LABELS,
    diffuse: Collection[str] = (),
    workers: int = 0,
) -> LesionPlanes | None:
    """The split's lesion masks on the model input, built on first use and cached; ``None`` without any.

    A pair is a positive (image, label) with a non-empty mask (:meth:`train.masks.MaskIndex.lookup`,
    read as the pointing game reads it). The planes are written under a
    temporary name and renamed into place, with a key over the recipe and every mask file, so a
    changed mask rebuilds them and an interrupted build leaves nothing a later run would trust.

    Args:
        source: The split (its photographs are decoded again, for their crop).
        preprocessing: The model card's preprocessing recipe.
        masks: The lesion masks (:func:`train.masks.find_masks`).
        cache_dir: Where to keep the planes (the preprocessing cache folder).
        labels: Labels whose lesions count (default: the 28 disease outputs).
        diffuse: Labels whose finding covers the retina (:data:`retinagate.labels.DIFFUSE_LABELS`): a
            positive one without a mask gets the field of view as its plane, once the split has a mask
            for anything at all (a set without masks stays without planes).
        workers: Decoding threads; 0 picks one per CPU core.
    """
    wanted = [(name, LABELS.index(name), name in diffuse) for name in labels]
    # Each positive pair's mask files; none for a diffuse finding without a mask (its plane is the retina).
    found: list[list[tuple[int, list[Path]]]] = []
    key_files: list[list[object]] = []
    for i in range(len(source)):
        pairs = []
        for name, column, whole in wanted:
            if not source.labels[i, column]:
                continue
            files = masks.lookup(source.paths[i], name)
            if files:
                pairs.append((column, files))
                key_files.extend([str(f), (stat := f.stat()).st_size, stat.st_mtime_ns] for f in files)
            elif whole:
                pairs.append((column, []))
        found.append(pairs)
    if not key_files:
        return None
    payload = {
        "format": _FORMAT,
        "images": cache_key(source, preprocessing),
        "masks": key_files,
        "diffuse": sorted(diffuse),
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"lesions-{source.split}-{key}.npy"
    index_file = final.with_suffix(".json")
    if final.is_file() and index_file.is_file():
        index = json.loads(index_file.read_text(encoding="utf-8"))
        logger.info("reusing lesion planes %s (%d pairs)", final.name, len(index["columns"]))
        return _planes(final, index)

    def work(i: int) -> list[tuple[int, NDArray[np.uint8]]]:
        if not found[i]:
            return []
        image = read_image(source.paths[i])
        fov = find_fov(image, preprocessing.fov_threshold)
        _, geometry = prepare_with_geometry(image, preprocessing, fov=fov)
        placed: list[tuple[int, NDArray[np.uint8]]] = []
        for column, files in found[i]:
            mask = read_lesion_mask(files, geometry.source_shape) if files else fov.coverage() >= 0.5
            if mask is None:
                continue
            plane = geometry.to_input(mask)
            if plane.any():
                placed.append((column, plane))
        return placed

    threads = workers if workers > 0 else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        per_image = list(pool.map(work, range(len(source))))
    size = preprocessing.input_size
    total = sum(len(pairs) for pairs in per_image)
    if total == 0:
        return None
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.npy")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, size, size))
        offsets, columns, row = [0], [], 0
        for image_pairs in per_image:
            for column, plane in image_pairs:
                array[row] = plane
                columns.append(column)
                row += 1
            offsets.append(row)
        array.flush()
        del array
        index = {"offsets": offsets, "columns": columns}
        index_file.write_text(json.dumps(index) + "\n", encoding="utf-8")
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    diffuse_pairs = sum(not files for pairs in found for _, files in pairs)
    logger.info(
        "placed %d lesion masks of %d %s images on the input (%d of them diffuse findings over the retina)",
        total, len(source), source.split, diffuse_pairs,
    )  # fmt: skip
    return _planes(final, index)


def _planes(cache_file: Path, index: dict[str, list[int]]) -> LesionPlanes:
    offsets = np.asarray(index["offsets"], np.intp)
    most = int(np.diff(offsets).max()) if offsets.size > 1 else 0
    return LesionPlanes(
        cache_file=cache_file,
        offsets=offsets,
        columns=np.asarray(index["columns"], np.intp),
        per_image=max(1, min(MAX_PAIRS_PER_IMAGE, most)),
    )
