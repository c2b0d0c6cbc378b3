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


def test_stale_temporaries_of_dead_or_restarted_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import os
    import subprocess
    import time

    from retinagate.storage import _host_tag

    storage = Storage(tmp_path / "storage")
    folder = storage.root / "in" / "2026" / "12" / "05"
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = _host_tag()
    names = {
        "dead writer here": f".a.dcm.{host}-{dead.pid}.00000001.tmp",
        "this process, before it wrote anything": f".b.dcm.{host}-{os.getpid()}.00000002.tmp",
        "a live writer here": f".c.dcm.{host}-{os.getppid()}.00000003.tmp",
        "another host, recent": ".d.dcm.elsewhere-1.00000004.tmp",
        "another host, a day old": ".e.dcm.elsewhere-1.00000005.tmp",
    }
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    os.utime(folder / names["another host, a day old"], (day_ago, day_ago))
    storage.write_bytes("in/2026/12/05/whole.dcm", b"whole")

    assert storage.remove_stale_temporaries() == 3

    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([names["a live writer here"], names["another host, recent"], "whole.dcm"])


def test_a_staged_file_whose_row_was_committed_is_put_in_place_at_the_next_start(tmp_path: Path) -> None:
    # The gateway stages the file, commits the row, then publishes; killed between the last two, its
    # next start finds the temporary file of a committed key and finishes the write.
    storage = Storage(tmp_path / "storage")
    committed, abandoned = storage.new_key("in"), storage.new_key("in")
    for key in (committed, abandoned):
        storage.stage(key, lambda out: out.write(b"whole photograph"))  # the writer dies here: no publish

    assert storage.remove_stale_temporaries(committed=lambda key: key == committed) == 2

    assert storage.path(committed).read_bytes() == b"whole photograph"
    assert not storage.path(abandoned).exists()
    assert not [p for p in storage.root.rglob("*.tmp")]
