"""Checkpoint helpers without Ray: stale-directory removal, the shard-count check, the universal conversion's
error. (Saving, resuming and exporting through Ray Train are tested in test_train.py.)"""

from __future__ import annotations

import json

import pyarrow.fs
import pytest

from raypatch.checkpoint import check_shards, clear_stale, to_universal, written_stage


def test_clear_stale_removes_a_directory_and_nothing_else(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    d = tmp_path / "run" / "checkpoint-0000008"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (tmp_path / "run" / "keep.txt").write_text("k")
    assert clear_stale(fs, str(d)) is True
    assert not d.exists() and (tmp_path / "run" / "keep.txt").exists()
    assert clear_stale(fs, str(d)) is False  # nothing there: a no-op


def shards(d, ranks):
    (d / "ds").mkdir(parents=True, exist_ok=True)
    for r in ranks:
        (d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_check_shards_accepts_one_shard_per_rank(tmp_path):
    shards(tmp_path, [0, 1])
    check_shards(tmp_path, 2)


@pytest.mark.parametrize("ranks,world", [([0, 1], 1), ([0], 2), ([0, 2], 2)])
def test_check_shards_names_a_mixed_or_incomplete_checkpoint(tmp_path, ranks, world):
    shards(tmp_path, ranks)
    with pytest.raises(ValueError, match=rf"{world} workers wrote it, but ds/ holds ZeRO shards of ranks"):
        check_shards(tmp_path, world)


def test_without_zero_one_model_states_file_and_no_shards(tmp_path):
    shards(tmp_path / "ok", [])
    check_shards(tmp_path / "ok", 2, stage=0)  # any worker count: the one file holds everything
    shards(tmp_path / "mixed", [0])
    with pytest.raises(ValueError, match=r"written without ZeRO, but ds/ holds ZeRO shards of ranks \[0\]"):
        check_shards(tmp_path / "mixed", 1, stage=0)
    (tmp_path / "empty" / "ds").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"written without ZeRO, but ds/ holds no mp_rank_00_model_states.pt"):
        check_shards(tmp_path / "empty", 1, stage=0)


def test_zero_stage_in_meta_is_checked(tmp_path):
    assert written_stage({}, tmp_path) == -1  # written before the stage was recorded
    assert written_stage({"zero_stage": 0}, tmp_path) == 0
    for bad in (4, "1", True, None):
        with pytest.raises(ValueError, match=rf"checkpoint {tmp_path}: meta.json field zero_stage must be 0, 1, 2 "):
            written_stage({"zero_stage": bad}, tmp_path)


def test_failed_universal_conversion_says_which_checkpoint_and_why(tmp_path):
    shards(tmp_path, [0])
    (tmp_path / "meta.json").write_text(json.dumps({"world_size": 1}))
    with pytest.raises(RuntimeError, match=rf"converting checkpoint {tmp_path} to a universal checkpoint failed"):
        to_universal(tmp_path)
    assert not list(tmp_path.glob(".ds_universal.tmp-*"))  # its temporary output is cleaned up
