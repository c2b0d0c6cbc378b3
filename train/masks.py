"""Lesion mask files: which masks belong to which photograph and label.

A lesion mask is a single-channel image the size of its photograph, non-zero on the pixels of one lesion
type (or one lesion of it); in a JPEG, whose ringing leaves faint values around every edge, above half
the range. :meth:`MaskIndex.scan` reads the masks once and gives each file
to the one photograph it names. Where it looks (:func:`find_masks`): ``--masks DIR``, every file under
it; otherwise the data folder, every file under a folder whose name says ``mask`` (``masks/``,
``Training_Set/Masks/``, ``Training/masks/``, ``Training_Masks/``, in any case) or has a word sets name
their lesion annotations by (``Lesions/``, ``segmentation/``, ``Annotations/``, ``GT/``,
``ground_truth/``). These layouts are
recognised, where ``<folders>`` is any folder path, empty included:

==========================================  ===============================================
``<folders>/<ID>_<COLUMN>.png``             one file per lesion type (``retinagate synth``)
``<folders>/<ID>_<COLUMN>_<n>.png``         several files of one type, one per lesion
``<folders>/<COLUMN>_<ID>.png``             the lesion type first
``<folders>/<ID>/<COLUMN>[_<n>].png``       a folder per photograph
``<folders>/<COLUMN>/<ID>.png``             a folder per lesion type
``<folders>/<ID>.png``                      one file per photograph, every lesion in it
``<folders>/<ID>_<kind>.png``               a lesion kind that names no column (IDRiD's ``_MA``,
                                            ``_HE``): one of the photograph's lesions, as above
==========================================  ===============================================

``ID`` is the photograph's RFMiD ID or its file name without the extension (leading zeros aside);
``COLUMN`` is an RFMiD column, in any case. The words of a name may be parted by ``_``, ``-``, ``.`` or
spaces, and a word that says ``mask`` (or ``gt``, ``lesion``, ``segmentation``) is passed over
(``7-MH_mask.png``, ``7_MH_gt.png``). A file whose last word names a structure of the eye (``_OD``,
``_disc``, ``_vessels``, ``_fovea``) is not a lesion and is not read. PNG, BMP, TIFF and JPEG files are
read. The ``OTHER`` output's
mask is the union of the masks of the 18 rare columns it stands for. A photograph's own file (the last
layout) is the mask of each of its positive labels that has no file of its own: exact for a photograph
with one finding, and for one with several each label's map is aimed at all of its lesions.

A file belongs to the photograph of that ID whose own folders (below the photographs' common folder)
include ``<folders>`` in order, compared in any case, a folder that says ``mask`` counting by the rest
of its name (``Training_Masks`` as ``Training``) or, failing that, not at all. RFMiD numbers every
split from 1, so ``masks/Training/1_DR.png`` is Training's photograph 1 and a flat ``masks/1_DR.png``
could be any split's. Such a file goes to the one of those photographs that has its finding (DR; for a
photograph's own file, any finding; for a rare column, OTHER) when the labels are given; one that still
fits more than one photograph is left out and counted, never guessed.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from os.path import commonpath
from pathlib import Path
from typing import TYPE_CHECKING, Final

import cv2
import numpy as np
from numpy.typing import NDArray

from retinagate.labels import DISEASE_RISK, LABELS, OTHER, OTHER_COLUMNS, RFMID_COLUMNS

if TYPE_CHECKING:
    from train.datasets import SplitSource

__all__ = [
    "LAYOUTS",
    "MASK_FOLDER_WORDS",
    "MASK_SUFFIXES",
    "MaskIndex",
    "find_masks",
    "photographs",
    "positive_labels",
    "read_lesion_mask",
]

#: File types read as masks.
MASK_SUFFIXES: Final = frozenset({".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"})
#: Lossy types, whose ringing would grow every lesion if any non-zero pixel counted: read above half range.
_LOSSY: Final = frozenset({".jpg", ".jpeg"})

#: The layouts :meth:`MaskIndex.scan` recognises, for messages.
LAYOUTS: Final = (
    "<folders>/<ID>_<COLUMN>.png",
    "<folders>/<ID>_<COLUMN>_<n>.png",
    "<folders>/<COLUMN>_<ID>.png",
    "<folders>/<ID>/<COLUMN>.png",
    "<folders>/<COLUMN>/<ID>.png",
    "<folders>/<ID>.png",
    "<folders>/<ID>_<kind>.png",
)

#: What the name of a folder :func:`find_masks` reads in a data folder says, for messages.
MASK_FOLDER_WORDS: Final = "mask, lesion, segmentation, annotation, ground truth or GT"

#: The column key of a photograph's own file: the mask of every positive label without one of its own.
_EVERY_LABEL: Final = "*"

logger = logging.getLogger(__name__)

_COLUMNS: Final = {name.upper(): name for name in RFMID_COLUMNS}
#: A word that says a folder (or a word of a file's name) holds masks: ``mask`` anywhere in it, or a word
#: sets name their lesion annotations by (``Lesions``, ``Segmentation``, ``Annotations``, ``GT``).
_MASK_WORD: Final = re.compile(
    r"[\s_.-]*(?:masks?|(?<![a-z])(?:lesions?|segmentations?|annotations?|gt|ground[\s_.-]?truths?)(?![a-z]))[\s_.-]*",
    re.IGNORECASE,
)
#: A word of a mask file's name.
_WORD: Final = re.compile(r"[^\s_.-]+")
#: Words that name a structure of the eye rather than a lesion (IDRiD's ``_OD`` optic disc masks).
_ANATOMY: Final = frozenset(
    {"od", "disc", "disk", "optic", "cup", "vessel", "vessels", "fovea", "macula", "fov", "roi"}
)

_Key = tuple[tuple[str, ...], str, str]  # (folders under the root, image ID, RFMiD column)


@dataclass(frozen=True)
class MaskIndex:
    """The lesion mask files of a set of photographs, by photograph and RFMiD column.

    Attributes:
        root: The folder scanned.
        files: ``(photograph, column)`` to its mask files, sorted.
        ambiguous: Mask files that fit more than one photograph (left out).
        unmatched: Mask files that fit no photograph.
    """

    root: Path
    files: Mapping[tuple[Path, str], tuple[Path, ...]]
    ambiguous: int = 0
    unmatched: int = 0

    @classmethod
    def scan(
        cls,
        root: Path,
        photographs: Iterable[tuple[Path, str]],
        *,
        mask_folders_only: bool = False,
        findings: Mapping[Path, Collection[str]] | None = None,
    ) -> MaskIndex:
        """The mask files under ``root`` of ``photographs`` (``(path, ID)`` pairs); none when ``root`` is
        not a folder. ``mask_folders_only``: only files under a folder whose name says ``mask`` (or
        lesion, segmentation, annotation, ground truth: a data folder, whose photographs must not be
        taken for masks). ``findings``: each photograph's positive labels (:func:`positive_labels`); a
        file that fits photographs of several folders goes to the one of them that has its finding."""
        root, photographs = Path(root), list(photographs)
        themselves = {Path(path).resolve() for path, _ in photographs}
        found: dict[tuple[_Key, ...], list[Path]] = defaultdict(list)
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            if path.suffix.lower() not in MASK_SUFFIXES or not path.is_file() or path.resolve() in themselves:
                continue
            parts = path.relative_to(root).parts
            if mask_folders_only and not any(_MASK_WORD.search(folder) for folder in parts[:-1]):
                continue
            found[_parse(parts)].append(path)
        files, ambiguous, unmatched = _assign(found, photographs, findings)
        return cls(root, files, ambiguous, unmatched)

    def __len__(self) -> int:
        return sum(len(paths) for paths in self.files.values())

    def lookup(self, image: Path, label: str) -> list[Path]:
        """The mask files of one label of one of the photographs scanned for (for ``OTHER``, those of its
        18 rare columns; for ``Disease_Risk``, any abnormality, all of them), or else the photograph's
        own file of every lesion, if it has one. Asked only for a label the photograph has."""
        if label == DISEASE_RISK:
            columns: Sequence[str] = (*RFMID_COLUMNS, _EVERY_LABEL)
        else:
            columns = OTHER_COLUMNS if label == OTHER else (label,)
        image = Path(image)
        found = [path for column in columns for path in self.files.get((image, column), ())]
        return found or list(self.files.get((image, _EVERY_LABEL), ()))

    def mask(self, image: Path, label: str, shape: tuple[int, int] | None = None) -> NDArray[np.bool_] | None:
        """The union of :meth:`lookup`'s files on a photograph of ``shape`` (:func:`read_lesion_mask`), or
        ``None`` when there are none."""
        return read_lesion_mask(self.lookup(image, label), shape)

    def describe(self) -> str:
        """What the scan found, for logs and errors: a count, or why nothing was found."""
        if not self.root.is_dir():
            return f"no mask folder {self.root}"
        left_out = [
            f"{count} {what}"
            for count, what in (
                (self.ambiguous, "fit photographs of more than one folder (name the split's folder)"),
                (self.unmatched, "name no photograph"),
            )
            if count
        ]
        note = f" ({'; '.join(left_out)})" if left_out else ""
        if self.files:
            photographs = len({image for image, _ in self.files})
            return f"{len(self)} lesion mask files of {photographs} photographs under {self.root}{note}"
        return (
            f"no lesion mask files of the photographs under {self.root}{note}; the layouts are "
            f"{', '.join(LAYOUTS)}, where <folders> are the photograph's folders and COLUMN an RFMiD column"
        )


def find_masks(
    masks: Path | None,
    data: Path | None,
    photographs: Iterable[tuple[Path, str]],
    findings: Mapping[Path, Collection[str]] | None = None,
) -> MaskIndex | None:
    """The masks of ``photographs`` (``(path, ID)`` pairs, ``findings`` their positive labels, as
    :meth:`MaskIndex.scan`): under ``masks`` when given (every file), else under the data folder's
    folders that say ``mask`` (or lesion, segmentation, annotation, ground truth). ``None`` when there is
    nowhere to look: neither folder given, or a data folder with no mask-type file under such a folder
    (a set without masks)."""
    if masks is not None:
        return MaskIndex.scan(Path(masks), photographs, findings=findings)
    if data is None:
        return None
    index = MaskIndex.scan(Path(data), photographs, mask_folders_only=True, findings=findings)
    return index if index.files or index.ambiguous or index.unmatched else None


def photographs(sources: Iterable[SplitSource]) -> list[tuple[Path, str]]:
    """Every ``(path, ID)`` of the splits: what :meth:`MaskIndex.scan` gives masks to."""
    return [pair for source in sources for pair in zip(source.paths, source.ids, strict=True)]


def positive_labels(sources: Iterable[SplitSource]) -> dict[Path, frozenset[str]]:
    """Each photograph of the splits with its positive labels (:data:`retinagate.labels.LABELS`)."""
    return {
        Path(path): frozenset(label for label, positive in zip(LABELS, row, strict=True) if positive)
        for source in sources
        for path, row in zip(source.paths, source.labels, strict=True)
    }


def read_lesion_mask(files: Sequence[Path], shape: tuple[int, int] | None = None) -> NDArray[np.bool_] | None:
    """The union of mask files (non-zero pixels; a JPEG's above half range) on a photograph of ``shape``
    (``(height, width)``; by default the first file's), or ``None`` when none can be read.

    A mask of another size with the photograph's aspect ratio (within 1%) is scaled onto it, a pixel
    counting where any lesion pixel falls; one of another shape is left out with a warning.
    """
    mask: NDArray[np.bool_] | None = None
    for path in files:
        plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if plane is None:
            logger.warning("lesion mask %s cannot be read; left out", path.name)
            continue
        shape = shape or (int(plane.shape[0]), int(plane.shape[1]))
        if plane.shape != shape:
            height, width = plane.shape
            if abs(width * shape[0] / (height * shape[1]) - 1) > 0.01:
                logger.warning(
                    "lesion mask %s is %dx%d, its photograph %dx%d; left out", path.name, width, height, *shape[::-1]
                )
                continue
            area = cv2.resize(plane.astype(np.float32), shape[::-1], interpolation=cv2.INTER_AREA)
            plane = np.where(area > 0, np.maximum(area, 1), 0).astype(np.uint8)
        lesion = plane > (127 if path.suffix.lower() in _LOSSY else 0)
        mask = lesion if mask is None else mask | lesion
    return mask


def _parse(parts: Sequence[str]) -> tuple[_Key, ...]:
    """The ``(folders, ID, column)`` readings of a mask file's path under the root, the likeliest first.

    A name is read as words parted by ``_``, ``-``, ``.`` or spaces, a word that says ``mask`` left out;
    an ID keeps its own separators (``left-12_ARMD``: ID ``left-12``). :func:`_assign` gives the file to
    the first reading that fits a photograph: a per-photograph folder's ``MH_3`` (lesion 3 of MH) and a
    lesion-type-first ``MH_7`` (photograph 7) read alike until the folders tell them apart.
    """
    *folders, name = parts
    stem = Path(name).stem
    words = [w for w in _WORD.finditer(stem) if not _MASK_WORD.fullmatch(w.group())]
    if not words:
        return ()
    text = [w.group() for w in words]
    columns = [_COLUMNS.get(w.upper()) for w in text]

    def span(start: int, stop: int) -> str:
        return stem[words[start].start() : words[stop - 1].end()]

    here = tuple(folders)
    readings: list[_Key] = []
    # <folders>/<ID>_<COLUMN>[_<n>]: the last word that names a column, with at most a number after it.
    for at in range(len(words) - 1, 0, -1):
        if (column := columns[at]) is not None and _instance(text[at + 1 :]):
            readings.append((here, span(0, at), column))
            break
    if (first := columns[0]) is not None:
        if folders and _instance(text[1:]):
            readings.append((here[:-1], folders[-1], first))  # <folders>/<ID>/<COLUMN>[_<n>]
        if len(words) > 1:
            readings.append((here, span(1, len(words)), first))  # <folders>/<COLUMN>_<ID>
    if folders and (kind := _COLUMNS.get(folders[-1].upper())) is not None:
        readings.append((here[:-1], span(0, len(words)), kind))  # <folders>/<COLUMN>/<ID>
    # <folders>/<ID>[_<kind>...]: every lesion of the photograph, its lesion type in words that name no
    # column (IDRiD's 7_MA, 7_HE); a file that names a structure rather than a lesion (7_OD) is none.
    if text[-1].casefold() not in _ANATOMY:
        for stop in range(len(words), 0, -1):
            readings.append((here, span(0, stop), _EVERY_LABEL))
            if text[stop - 1].casefold() in _ANATOMY or columns[stop - 1] is not None:
                break
    return tuple(readings)


def _instance(tokens: Iterable[str]) -> bool:
    """Whether what follows a column is empty or one lesion's number."""
    rest = list(tokens)
    return not rest or (len(rest) == 1 and rest[0].isdigit())


def _name(text: str) -> str:
    """An ID or file name as compared: any case, a number without its leading zeros."""
    return str(int(text)) if text.isdigit() else text.casefold()


def _assign(
    found: Mapping[tuple[_Key, ...], Sequence[Path]],
    photographs: Sequence[tuple[Path, str]],
    findings: Mapping[Path, Collection[str]] | None = None,
) -> tuple[dict[tuple[Path, str], tuple[Path, ...]], int, int]:
    """Each file given by the first of its readings that fits a photograph, when it fits just one, or
    just one of those with its finding (``findings``): ``(files, ambiguous, unmatched)``."""
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, (path, image_id) in enumerate(photographs):
        for name in {_name(image_id), _name(Path(path).stem)}:
            by_name[name].append(i)
    parents = [Path(path).parent for path, _ in photographs]
    top = Path(commonpath(parents)).parent if parents else Path()  # every parent lies under it
    folders = [tuple(f.casefold() for f in parent.relative_to(top).parts) for parent in parents]

    def fitting(key_folders: Sequence[str], name: str) -> set[int]:
        for wanted in _readings(key_folders):
            if fits := {i for i in by_name.get(_name(name), ()) if _within(wanted, folders[i])}:
                return fits
        return set()

    files: dict[tuple[Path, str], tuple[Path, ...]] = {}
    ambiguous = unmatched = 0
    for readings, paths in found.items():
        fits: set[int] = set()
        column = ""
        for key_folders, name, reading in readings:
            if fits := fitting(key_folders, name):
                column = reading
                break
        if len(fits) > 1 and findings is not None:
            label = _label(column)
            fits = {i for i in fits if label in findings.get(Path(photographs[i][0]), ())} or fits
        if len(fits) == 1:
            image = Path(photographs[fits.pop()][0])
            files[image, column] = tuple(sorted((*files.get((image, column), ()), *paths)))
        elif fits:
            ambiguous += len(paths)
        else:
            unmatched += len(paths)
    return files, ambiguous, unmatched


def _label(column: str) -> str:
    """The model's output a mask file's column is a finding of (a photograph's own file: any finding)."""
    if column == _EVERY_LABEL:
        return DISEASE_RISK
    return OTHER if column in OTHER_COLUMNS else column


def _readings(folders: Sequence[str]) -> list[tuple[str, ...]]:
    """The folder paths a mask's folders may name: a folder that says ``mask`` read as the rest of its
    name, then without it."""
    named = tuple(rest.casefold() for f in folders if (rest := _MASK_WORD.sub("", f)))
    plain = tuple(f.casefold() for f in folders if not _MASK_WORD.search(f))
    return [named] if named == plain else [named, plain]


def _within(wanted: Sequence[str], folders: Sequence[str]) -> bool:
    """Whether ``wanted`` appear in ``folders`` in order (not necessarily next to each other)."""
    remaining = iter(folders)
    return all(any(f == w for f in remaining) for w in wanted)
