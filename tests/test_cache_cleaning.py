"""`lora_ops.cache_cleaning.sweep`: what gradio's cache cleaner leaves behind, and nothing else."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lora_ops.cache_cleaning import sweep

HOUR = 3600


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_old_empty_folders_and_files_go_with_their_empty_parents(tmp_path):
    nested = tmp_path / "a" / "b" / "c"
    nested.mkdir(parents=True)
    upload_temporary = tmp_path / "tmpabc123"
    upload_temporary.touch()
    for path in (nested, nested.parent, nested.parent.parent, upload_temporary):
        _age(path, 2 * HOUR)
    assert sweep(tmp_path, max_age=HOUR) == 4
    assert list(tmp_path.iterdir()) == []


def test_files_with_bytes_young_things_and_the_root_stay(tmp_path):
    kept = tmp_path / "hash" / "lora.safetensors"
    kept.parent.mkdir()
    kept.write_bytes(b"weights")
    young_folder = tmp_path / "just-made"
    young_folder.mkdir()
    young_file = tmp_path / "tmp-uploading"
    young_file.touch()
    for path in (kept, kept.parent):
        _age(path, 2 * HOUR)
    _age(tmp_path, 2 * HOUR)
    assert sweep(tmp_path, max_age=HOUR) == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["hash", "just-made", "lora.safetensors", "tmp-uploading"]


def test_a_missing_root_is_nothing_to_do(tmp_path):
    assert sweep(tmp_path / "never-made", max_age=HOUR) == 0
