"""Lesion mask files: which masks belong to which photograph and label.

A lesion mask is a lossless single-channel image the size of its photograph, non-zero on the pixels of
one lesion type (or one lesion of it). :meth:`MaskIndex.scan` reads a mask folder (by default the data
folder's ``masks``, in any case, or ``--masks``: :func:`mask_folder`) once and recognises these
layouts, where ``<folder>`` is the name of the photograph's own folder, or its last few folders
(``Training`` or ``Training_Set/Training`` for ``Training_Set/Training/12.png``):

==========================================  ===============================================
``<folder>/<ID>_<COLUMN>.png``              one file per lesion type (``retinagate synth``)
``<folder>/<ID>_<COLUMN>_<n>.png``          several files of one type, one per lesion
``<folder>/<ID>/<COLUMN>[_<n>].png``        a folder per photograph
``<folder>/<COLUMN>/<ID>.png``              a folder per lesion type
==========================================  ===============================================

``ID`` is the photograph's RFMiD ID or its file name without the extension; ``COLUMN`` is an RFMiD
column, in any case. PNG, BMP and TIFF files are read. The ``OTHER`` output's mask is the union of the
masks of the 18 rare columns it stands for. The folder level is required: RFMiD numbers each split
from 1, so a file named only by ID could belong to a photograph of any split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

from retinagate.labels import OTHER, OTHER_COLUMNS, RFMID_COLUMNS

__all__ = ["LAYOUTS", "MASK_SUFFIXES", "MaskIndex", "mask_folder", "read_lesion_mask"]

#: File types read as masks (lossless only: a JPEG's ringing would grow every lesion).
MASK_SUFFIXES: Final = frozenset({".png", ".bmp", ".tif", ".tiff"})

#: The layouts :meth:`MaskIndex.scan` recognises, for messages.
LAYOUTS: Final = (
    "<folder>/<ID>_<COLUMN>.png",
    "<folder>/<ID>_<COLUMN>_<n>.png",
    "<folder>/<ID>/<COLUMN>.png",
    "<folder>/<COLUMN>/<ID>.png",
)

_COLUMNS: Final = {name.upper(): name for name in RFMID_COLUMNS}

_Key = tuple[tuple[str, ...], str, str]  # (folders under the root, image ID, RFMiD column)


@dataclass(frozen=True)
class MaskIndex:
    """The lesion mask files under one folder, by photograph folder, image ID and RFMiD column.

    Attributes:
        root: The folder scanned.
        files: ``(folders under root, ID, column)`` to the mask files, sorted.
        ignored: Files of a mask type under ``root`` that fit none of the layouts (for messages).
    """

    root: Path
    files: Mapping[_Key, tuple[Path, ...]]
    ignored: int = 0

    @classmethod
    def scan(cls, root: Path) -> MaskIndex:
        """Every mask file under ``root`` (none when it is not a folder)."""
        root = Path(root)
        found: dict[_Key, list[Path]] = defaultdict(list)
        ignored = 0
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            if path.suffix.lower() not in MASK_SUFFIXES or not path.is_file():
                continue
            key = _parse(path.relative_to(root).parts)
            if key is None:
                ignored += 1
            else:
                found[key].append(path)
        return cls(root, {key: tuple(paths) for key, paths in found.items()}, ignored)

    def __len__(self) -> int:
        return sum(len(paths) for paths in self.files.values())

    def lookup(self, image: Path, image_id: str, label: str) -> list[Path]:
        """The mask files of one label of one photograph (for ``OTHER``, those of its 18 rare columns).

        Args:
            image: The photograph's path (its folders pick the mask folder).
            image_id: Its ID (RFMiD ``ID``); its file name without the extension is tried as well.
            label: An RFMiD column or ``OTHER``.
        """
        columns = OTHER_COLUMNS if label == OTHER else (label,)
        folders = Path(image).parent.parts
        ids = dict.fromkeys((image_id, Path(image).stem))
        return [
            path
            for column in columns
            for depth in range(1, len(folders) + 1)
            for name in ids
            for path in self.files.get((folders[-depth:], name, column), ())
        ]

    def mask(self, image: Path, image_id: str, label: str) -> NDArray[np.bool_] | None:
        """The union of :meth:`lookup`'s files, or ``None`` when there are none."""
        return read_lesion_mask(self.lookup(image, image_id, label))

    def describe(self) -> str:
        """What the scan found, for logs and errors: a count, or why nothing was found."""
        if not self.root.is_dir():
            return f"no mask folder {self.root}"
        if self.files:
            return f"{len(self)} lesion mask files under {self.root}"
        return (
            f"no lesion mask files under {self.root} ({self.ignored} image files fit none of the layouts "
            f"{', '.join(LAYOUTS)}; <folder> is the photographs' folder, COLUMN an RFMiD column)"
        )


def mask_folder(masks: Path | None, data: Path | None) -> Path | None:
    """The mask folder asked for: ``masks`` when given, else the data folder's own ``masks`` folder in
    any case (``<data>/masks`` when it has none); ``None`` with neither. It need not exist."""
    if masks is not None:
        return Path(masks)
    if data is None:
        return None
    data = Path(data)
    found = sorted(p for p in data.iterdir() if p.name.lower() == "masks" and p.is_dir()) if data.is_dir() else []
    return found[0] if found else data / "masks"


def read_lesion_mask(files: Sequence[Path]) -> NDArray[np.bool_] | None:
    """The union of mask files (non-zero pixels), or ``None`` when none can be read."""
    mask: NDArray[np.bool_] | None = None
    for path in files:
        plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if plane is None:
            continue
        mask = plane > 0 if mask is None else mask | (plane > 0)
    return mask


def _parse(parts: Sequence[str]) -> _Key | None:
    """``(folders, ID, column)`` of a mask file's path under the root, or ``None`` if no layout fits."""
    *folders, name = parts
    stem = Path(name).stem
    # <folder>/<ID>_<COLUMN>[_<n>]: the last token that names a column, with only a number after it.
    tokens = stem.split("_")
    for at in range(len(tokens) - 1, 0, -1):
        column = _COLUMNS.get(tokens[at].upper())
        if column is not None and _instance(tokens[at + 1 :]) and folders:
            return tuple(folders), "_".join(tokens[:at]), column
    if len(folders) >= 2:
        parent = folders[-1]
        # <folder>/<ID>/<COLUMN>[_<n>]
        column = _COLUMNS.get(tokens[0].upper())
        if column is not None and _instance(tokens[1:]):
            return tuple(folders[:-1]), parent, column
        # <folder>/<COLUMN>/<ID>
        column = _COLUMNS.get(parent.upper())
        if column is not None:
            return tuple(folders[:-1]), stem, column
    return None


def _instance(tokens: Iterable[str]) -> bool:
    """Whether what follows a column is empty or one lesion's number."""
    rest = list(tokens)
    return not rest or (len(rest) == 1 and rest[0].isdigit())
