"""Durable storage with server-generated keys."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

import pytest

from retinagate.storage import Storage, StorageError


def test_write_is_atomic_and_hashes_what_it_wrote(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    key = storage.new_key()
    digest, size = storage.write_bytes(key, b"DICM" * 100)
    assert storage.path(key).read_bytes() == b"DICM" * 100
    assert digest == hashlib.sha256(b"DICM" * 100).hexdigest()
    assert size == 400
    assert list(storage.iter_keys()) == [key]


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    key = storage.new_key()

    def broken(f: BinaryIO) -> None:
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(StorageError, match="disk on fire"):
        storage.write(key, broken)
    assert not storage.path(key).exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_keys_are_generated_and_cannot_escape_the_folder(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    assert storage.new_key() != storage.new_key()
    assert storage.new_key("out").startswith("out/")
    with pytest.raises(ValueError, match="outside"):
        storage.path("../../etc/passwd")
    with pytest.raises(ValueError, match="kind"):
        storage.new_key("../x")
