"""Training data: RFMiD folders and generic CSVs, decoded and preprocessed once into an on-disk cache.

Two sources:

* **RFMiD layout** (``--data DIR``): label CSVs with an ``ID`` column and the 46 RFMiD columns, one per
  split, and folders of ``<ID>.png`` images. Both the official download (``Training_Set/Training_Set/
  Training`` + ``RFMiD_Training_Labels.csv``, ``Evaluation_Set/Evaluation_Set/Validation`` +
  ``RFMiD_Validation_Labels.csv``, ``Test_Set/Test_Set/Test`` + ``RFMiD_Testing_Labels.csv``) and
  ``retinagate synth`` output (``Training/``, ``Evaluation/``, ``Test/`` beside the CSVs) work: CSVs
  are recognised by their columns and their names, and each split's image folder is the folder that
  holds every listed ``<ID>`` image, found by searching rather than by a fixed path.
* **Generic CSV** (``--labels-csv CSV --images DIR``): a path column (``path``, ``image``, ``file``,
  ``filename`` or ``image_path``), label columns named like the model's 29 labels (or the 46 RFMiD
  columns), and an optional ``split`` column (``train``/``val``/``test``); without it, rows are split
  deterministically by a hash of their path.

Photographs are decoded, FOV-cropped and resized with :func:`retinagate.preprocess.prepare`, the function
the worker uses, once per (source files, preprocessing recipe), into one ``uint8 (N, S, S, 3)`` ``.npy``
per split that later epochs and later runs memory-map. The cache key covers each file's resolved path,
size and modification time and the card's preprocessing JSON, so an edited photograph or a new input
size builds a new cache instead of reading a stale one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from retinagate.card import Preprocessing
from retinagate.labels import LABELS, NUM_LABELS, RFMID_COLUMNS, labels_from_rfmid_row
from retinagate.preprocess import prepare

__all__ = [
    "CACHE_FORMAT",
    "IMAGE_EXTENSIONS",
    "PATH_COLUMNS",
    "SPLITS",
    "CachedSplit",
    "DataSourceError",
    "MissingDataError",
    "SplitSource",
    "cache_key",
    "cache_split",
    "evenly_spaced",
    "find_rfmid_splits",
    "load_splits",
    "read_csv_splits",
    "read_image",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: Final[tuple[Split, ...]] = ("train", "val", "test")
CACHE_FORMAT: Final = "retinagate-cache/1"
IMAGE_EXTENSIONS: Final = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PATH_COLUMNS: Final = ("path", "image", "file", "filename", "image_path")

#: Folder names (lower case) that name a split, in order of preference.
_SPLIT_FOLDERS: Final[Mapping[Split, tuple[str, ...]]] = {
    "train": ("training", "train"),
    "val": ("validation", "evaluation", "valid", "val"),
    "test": ("testing", "test"),
}
_SPLIT_ALIASES: Final[Mapping[str, Split]] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "evaluation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


class DataSourceError(ValueError):
    """The data folder or CSV cannot be used as given; the message says what is wrong and where."""


class MissingDataError(DataSourceError):
    """A named data folder, CSV or image file does not exist."""


@dataclass(frozen=True)
class SplitSource:
    """The images and labels of one split, before decoding.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        ids: Image identifiers (RFMiD ``ID`` or the CSV path), for reports; never patient data.
        paths: Image files, resolved.
        labels: ``uint8 (N, 29)`` in :data:`retinagate.labels.LABELS` order.
        origin: Where the labels came from (CSV path), for the model card.
    """

    split: Split
    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: NDArray[np.uint8]
    origin: str

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class CachedSplit:
    """A split whose photographs are preprocessed and stored as one memory-mapped array.

    Attributes:
        source: The split's files and labels.
        images: ``uint8 (N, S, S, 3)`` read-only memory map of the cache file.
        cache_file: The ``.npy`` holding ``images``.
        built: Whether this call built the cache (``False``: reused).
    """

    source: SplitSource
    images: NDArray[np.uint8]
    cache_file: Path
    built: bool

    @property
    def labels(self) -> NDArray[np.uint8]:
        return self.source.labels

    def __len__(self) -> int:
        return len(self.source)


def _read_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return next(csv.reader(handle), [])


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return [
            {k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in csv.DictReader(handle)
        ]


def _csv_split(name: str) -> Split | None:
    lower = name.lower()
    if "train" in lower:
        return "train"
    if "valid" in lower or "eval" in lower:
        return "val"
    if "test" in lower:
        return "test"
    return None


def _walk(root: Path, skip: Iterable[Path] = ()) -> Iterable[tuple[Path, list[str]]]:
    """Yields (folder, file names) under ``root``, skipping hidden folders and ``skip``."""
    skipped = {p.resolve() for p in skip}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skipped)
        yield here, files


def _image_index(files: Iterable[str]) -> dict[str, str]:
    """Maps image stem to file name for the image files among ``files``."""
    index: dict[str, str] = {}
    for name in sorted(files):
        path = Path(name)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            index.setdefault(path.stem, name)
    return index


def find_rfmid_splits(root: Path, *, skip: Sequence[Path] = ()) -> dict[Split, SplitSource]:
    """Finds the RFMiD label CSVs and image folders under ``root``.

    Args:
        root: The dataset folder (official RFMiD download or ``retinagate synth`` output).
        skip: Folders not to search (the preprocessing cache when it lives inside ``root``).

    Returns:
        The splits found, by name; ``train`` and ``val`` are always present.

    Raises:
        DataSourceError: When ``root`` is missing, a split's CSV is missing or ambiguous, a CSV lacks
            RFMiD columns, or no folder holds a split's images (names the CSV and the missing files).
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"--data: no such folder: {root}")
    folders = list(_walk(root, skip))
    csvs: dict[Split, list[Path]] = {}
    incomplete: list[str] = []
    for folder, files in folders:
        for name in files:
            if not name.lower().endswith(".csv"):
                continue
            split = _csv_split(name)
            if split is None:
                continue
            path = folder / name
            header = [h.strip() for h in _read_header(path)]
            if "ID" not in header:
                continue
            missing = [c for c in RFMID_COLUMNS if c not in header]
            if missing:
                incomplete.append(f"{path} lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
                continue
            csvs.setdefault(split, []).append(path)
    for split in ("train", "val"):
        if split not in csvs:
            hint = f" (CSVs without all 46 RFMiD columns: {'; '.join(incomplete)})" if incomplete else ""
            raise DataSourceError(
                f"--data {root}: no RFMiD label CSV for the {split} split; expected a CSV whose name contains "
                f"{'Training' if split == 'train' else 'Validation or Evaluation'} with columns ID and the 46 "
                f"RFMiD columns{hint}"
            )
    for split, found in csvs.items():
        if len(found) > 1:
            raise DataSourceError(
                f"--data {root}: several label CSVs for the {split} split: {', '.join(map(str, found))}; keep one"
            )

    indexes = [(folder, _image_index(files)) for folder, files in folders]
    out: dict[Split, SplitSource] = {}
    for split, (csv_path,) in sorted(csvs.items()):
        rows = _read_rows(csv_path)
        if not rows:
            raise DataSourceError(f"{csv_path}: no rows")
        ids = [row["ID"] for row in rows]
        try:
            labels = np.stack([labels_from_rfmid_row(row) for row in rows])
        except ValueError as exc:
            raise DataSourceError(f"{csv_path}: {exc}") from None
        best_folder, index = _best_folder(root, split, ids, indexes)
        missing_ids = [i for i in ids if i not in index]
        if missing_ids or best_folder is None:
            best = f"best match {best_folder} holds {len(ids) - len(missing_ids)} of them" if best_folder else "none"
            raise MissingDataError(
                f"{csv_path} lists {len(ids)} images but no folder under {root} holds them all ({best}; "
                f"missing e.g. {', '.join(i + '.png' for i in missing_ids[:3])})"
            )
        out[split] = SplitSource(
            split=split,
            ids=tuple(ids),
            paths=tuple((best_folder / index[i]).resolve() for i in ids),
            labels=labels.astype(np.uint8),
            origin=str(csv_path),
        )
    return out


def _best_folder(
    root: Path, split: Split, ids: Sequence[str], indexes: Sequence[tuple[Path, dict[str, str]]]
) -> tuple[Path | None, dict[str, str]]:
    """The folder most likely to hold a split's images.

    RFMiD numbers images from 1 in every split, so the training folder also holds files named like
    the test IDs: a folder named for the split (``Test``, or inside ``Test_Set``) therefore beats an
    unnamed one even when it lacks some files (that gets reported as missing files, not silently
    swapped for training images). Among equals, the folder with the most matches wins, then the
    folder whose own name is the split's, then the shallowest.
    """
    best: tuple[tuple[int, int, int, int], Path, dict[str, str]] | None = None
    names = _SPLIT_FOLDERS[split]
    for folder, index in indexes:
        if not index:
            continue
        matched = sum(1 for i in ids if i in index)
        if matched == 0:
            continue
        parts = [p.lower() for p in folder.relative_to(root).parts]
        own = bool(parts) and parts[-1] in names
        inside = any(p.startswith(names) for p in parts)
        rank = (int(own or inside), matched, int(own), -len(parts))
        if best is None or rank > best[0]:
            best = (rank, folder, index)
    return (best[1], best[2]) if best else (None, {})


def _hash_split(key: str, seed: int, val_fraction: float, test_fraction: float) -> Split:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_csv_splits(
    labels_csv: Path,
    images: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
) -> dict[Split, SplitSource]:
    """Reads a generic CSV: a path column, label columns and an optional ``split`` column.

    Args:
        labels_csv: The CSV. Label columns are the model's 29 label names (0/1), or the 46 RFMiD
            columns (mapped to the 29 labels).
        images: Folder that relative paths in the CSV start from. A path without an extension is
            tried with each of :data:`IMAGE_EXTENSIONS`.
        seed: Seed of the hash split, used when there is no ``split`` column.
        val_fraction: Share of rows for validation in the hash split.
        test_fraction: Share of rows for test in the hash split.

    Raises:
        DataSourceError: Missing file or folder, missing columns (named), bad values, missing images.
    """
    labels_csv, images = Path(labels_csv), Path(images)
    if not labels_csv.is_file():
        raise MissingDataError(f"--labels-csv: no such file: {labels_csv}")
    if not images.is_dir():
        raise MissingDataError(f"--images: no such folder: {images}")
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DataSourceError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) with a sum below 1"
        )
    header = [h.strip() for h in _read_header(labels_csv)]
    lower = {h.lower(): h for h in header}
    path_column = next((lower[c] for c in PATH_COLUMNS if c in lower), None)
    if path_column is None:
        raise DataSourceError(
            f"{labels_csv}: no path column; expected one of {', '.join(PATH_COLUMNS)} (found: {', '.join(header)})"
        )
    use_rfmid = all(c in header for c in RFMID_COLUMNS) and not all(c in header for c in LABELS)
    if not use_rfmid:
        missing = [c for c in LABELS if c not in header]
        if missing:
            raise DataSourceError(
                f"{labels_csv}: missing label columns {', '.join(missing)}; the CSV needs one 0/1 column per "
                f"label ({', '.join(LABELS)}) or the 46 RFMiD columns"
            )
    split_column = lower.get("split")
    rows = _read_rows(labels_csv)
    if not rows:
        raise DataSourceError(f"{labels_csv}: no rows")

    grouped: dict[Split, tuple[list[str], list[Path], list[NDArray[np.uint8]]]] = {}
    missing_files: list[str] = []
    for line, row in enumerate(rows, start=2):
        raw = row[path_column]
        if not raw:
            raise DataSourceError(f"{labels_csv} line {line}: empty {path_column}")
        path = _resolve_image(images, raw)
        if path is None:
            missing_files.append(raw)
            continue
        try:
            vector = labels_from_rfmid_row(row) if use_rfmid else _label_vector(row)
        except ValueError as exc:
            raise DataSourceError(f"{labels_csv} line {line}: {exc}") from None
        if split_column is not None:
            value = row[split_column].lower()
            if value not in _SPLIT_ALIASES:
                raise DataSourceError(
                    f"{labels_csv} line {line}: split is {row[split_column]!r}; expected train, val or test"
                )
            split = _SPLIT_ALIASES[value]
        else:
            split = _hash_split(raw, seed, val_fraction, test_fraction)
        ids, paths, labels = grouped.setdefault(split, ([], [], []))
        ids.append(raw)
        paths.append(path)
        labels.append(vector)
    if missing_files:
        raise MissingDataError(
            f"{labels_csv}: {len(missing_files)} images not found under {images} (e.g. {', '.join(missing_files[:3])})"
        )
    for split in ("train", "val"):
        if split not in grouped:
            raise DataSourceError(f"{labels_csv}: no rows for the {split} split")
    return {
        split: SplitSource(split, tuple(ids), tuple(paths), np.stack(labels).astype(np.uint8), str(labels_csv))
        for split, (ids, paths, labels) in sorted(grouped.items())
    }


def _label_vector(row: Mapping[str, str]) -> NDArray[np.uint8]:
    out = np.zeros(NUM_LABELS, dtype=np.uint8)
    for i, name in enumerate(LABELS):
        raw = row[name]
        try:
            value = int(float(raw))
        except ValueError:
            raise ValueError(f"column {name!r} holds {raw!r}; expected 0 or 1") from None
        if value not in (0, 1):
            raise ValueError(f"column {name!r} holds {raw!r}; expected 0 or 1")
        out[i] = value
    return out


def _resolve_image(images: Path, raw: str) -> Path | None:
    path = Path(raw)
    if not path.is_absolute():
        path = images / path
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return path.resolve() if path.is_file() else None
    for ext in IMAGE_EXTENSIONS:
        candidate = path.with_name(path.name + ext)
        if candidate.is_file():
            return candidate.resolve()
    return path.resolve() if path.is_file() else None


def load_splits(
    *,
    data: Path | None = None,
    labels_csv: Path | None = None,
    images: Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    skip: Sequence[Path] = (),
) -> dict[Split, SplitSource]:
    """Loads the split sources from ``data`` (RFMiD layout) or from ``labels_csv`` + ``images``.

    Raises:
        DataSourceError: When neither or both sources are given, or the source is unusable.
    """
    if data is not None and labels_csv is not None:
        raise DataSourceError("give either --data (RFMiD layout) or --labels-csv with --images, not both")
    if data is not None:
        return find_rfmid_splits(data, skip=skip)
    if labels_csv is not None:
        if images is None:
            raise DataSourceError("--labels-csv needs --images DIR (the folder the CSV's paths start from)")
        return read_csv_splits(labels_csv, images, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    raise DataSourceError("no training data: give --data DIR (RFMiD layout) or --labels-csv CSV --images DIR")


def evenly_spaced(count: int, limit: int) -> NDArray[np.intp]:
    """Indices of an evenly spaced selection of at most ``limit`` of ``count`` items (all if fewer), ascending."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.intp))


def read_image(path: Path) -> NDArray[np.uint8]:
    """Decodes a photograph to ``(H, W, 3)`` uint8 RGB.

    Raises:
        DataSourceError: If the file cannot be decoded (names it).
    """
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataSourceError(f"cannot decode image {path}")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def cache_key(source: SplitSource, preprocessing: Preprocessing) -> str:
    """What decides a split's cached pixels: the cache format, the recipe and every file's size and mtime."""
    files = []
    for path in source.paths:
        stat = path.stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    # Local contrast runs in the graph, after the cache (train.augment.Normalizer): not part of the key.
    recipe = preprocessing.model_dump(mode="json", exclude={"contrast_sigma", "contrast_gain"})
    payload = {"format": CACHE_FORMAT, "preprocessing": recipe, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_split(
    source: SplitSource,
    preprocessing: Preprocessing,
    cache_dir: Path,
    *,
    workers: int = 0,
    progress: bool = True,
) -> CachedSplit:
    """Returns the split's preprocessed images, building the cache file on first use.

    The array is written under a temporary name and renamed into place when complete, so an
    interrupted build leaves no cache that a later run would trust.

    Args:
        source: The split's files and labels.
        preprocessing: The model card's preprocessing recipe (decides the pixels and the key).
        cache_dir: Folder for the cache files (created if missing).
        workers: Decoding threads; 0 picks one per CPU core.
        progress: Show a progress bar on stderr while building.

    Raises:
        DataSourceError: If an image cannot be decoded.
    """
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, preprocessing)
    final = cache_dir / f"{source.split}-{key[:24]}.npy"
    if final.is_file():
        images = np.load(final, mmap_mode="r")
        size = preprocessing.input_size
        if images.shape == (len(source), size, size, 3) and images.dtype == np.uint8:
            logger.info("reusing cache %s (%d images)", final.name, len(source))
            return CachedSplit(source, images, final, built=False)
        logger.warning("cache %s has shape %s; rebuilding", final.name, images.shape)

    size = preprocessing.input_size
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.npy")
    started = time.perf_counter()
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(source), size, size, 3))
    try:

        def work(index: int) -> None:
            array[index] = prepare(read_image(source.paths[index]), preprocessing)

        threads = workers if workers > 0 else (os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            bar = tqdm(
                pool.map(work, range(len(source))),
                total=len(source),
                desc=f"caching {source.split}",
                unit="img",
                disable=not progress,
                leave=False,
            )
            for _ in bar:
                pass
        array.flush()
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "split": source.split,
        "count": len(source),
        "preprocessing": preprocessing.model_dump(mode="json"),
        "origin": source.origin,
        "seconds": round(time.perf_counter() - started, 3),
    }
    final.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("cached %d %s images in %.1f s", len(source), source.split, meta["seconds"])
    return CachedSplit(source, np.load(final, mmap_mode="r"), final, built=True)
