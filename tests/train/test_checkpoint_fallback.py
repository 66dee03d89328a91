"""A half-written or corrupt latest checkpoint is detected (manifests with sizes and sha256,
written last by every rank), and resuming falls back to the newest complete checkpoint.
Through Ray Train: test_fault_tolerance.py::test_corrupt_latest_checkpoint_resumes_from_the_previous_one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from ray.train import Checkpoint

from lorafleet.train import checkpoint as ckpt


def _fake_checkpoint(folder: Path, step: int, world: int = 2) -> Path:
    """The files of a 2-rank checkpoint as Ray merges them from the ranks' folders, each rank's manifest written last."""
    for rank in range(world):
        part = folder.parent / f".{folder.name}-rank{rank}"
        (part / "dcp").mkdir(parents=True)
        (part / "dcp" / f"__{rank}_0.distcp").write_bytes(bytes([rank, step]) * 1000)
        if rank == 0:
            (part / "dcp" / ".metadata").write_bytes(b"metadata")
            (part / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step}))
        with pytest.MonkeyPatch.context() as m:  # as if this process were rank `rank` of `world`
            m.setattr(ckpt, "_rank", lambda: rank)
            m.setattr(ckpt.dist, "is_initialized", lambda: True)
            m.setattr(ckpt.dist, "get_world_size", lambda: world)
            ckpt.write_manifest(part)
        for f in sorted(part.rglob("*")):
            if f.is_file():
                (folder / f.relative_to(part)).parent.mkdir(parents=True, exist_ok=True)
                f.rename(folder / f.relative_to(part))
    return folder


def test_manifest_detects_truncated_missing_and_half_written_files(tmp_path):
    good = _fake_checkpoint(tmp_path / "checkpoint_a", step=5)
    assert ckpt.verify_checkpoint(good) is None

    shard = good / "dcp" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert "__1_0.distcp (rank 1) has 1000 bytes, not 2000" in ckpt.verify_checkpoint(good)
    shard.write_bytes(data[:-1] + b"\xff")  # same size, other content
    assert "does not match its sha256" in ckpt.verify_checkpoint(good)
    shard.unlink()
    assert "__1_0.distcp (rank 1) is missing" in ckpt.verify_checkpoint(good)

    half = _fake_checkpoint(tmp_path / "checkpoint_b", step=5)
    (half / "lorafleet_manifest.rank1.json").unlink()
    assert ckpt.verify_checkpoint(half) == "no manifest of rank(s) [1] of 2 (half-written)"
    (half / "lorafleet_manifest.rank0.json").unlink()
    assert "half-written" in ckpt.verify_checkpoint(half)


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    paths = [_fake_checkpoint(run / f"checkpoint_2025-01-01_00-00-0{i}.000000", step=5 * (i + 1)) for i in range(3)]
    latest = Checkpoint(str(paths[2]))
    assert ckpt.choose_resume_checkpoint(latest) is latest
    # Ray registered step 10 only (the workers died before it recorded step 15): the newer complete one wins.
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert Path(ckpt.choose_resume_checkpoint(Checkpoint(str(paths[1]))).path) == paths[2]
    assert "unregistered" in caplog.text
    caplog.clear()

    (paths[2] / "dcp" / "__0_0.distcp").write_bytes(b"")  # truncated
    (paths[1] / "lorafleet_manifest.rank0.json").unlink()  # half-written
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        chosen = ckpt.choose_resume_checkpoint(latest)
    assert Path(chosen.path) == paths[0]
    assert str(paths[2]) in caplog.text and f"{paths[0]} (step 5)" in caplog.text

    (paths[0] / "trainer_state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no complete checkpoint to resume from") as err:
        ckpt.choose_resume_checkpoint(latest)
    assert all(p.name in str(err.value) for p in paths) and f"Delete {run}" in str(err.value)


def test_without_a_registered_checkpoint_resume_finds_the_complete_one_in_the_run_storage(tmp_path, caplog):
    """A driver killed before Ray registered the run's first checkpoint: the re-submitted run has no
    ``latest``, but the workers had written complete checkpoints; it resumes from the newest, not step 0."""
    run = tmp_path / "run"
    assert ckpt.choose_resume_checkpoint(None, str(run)) is None  # a new run: nothing there yet
    assert ckpt.choose_resume_checkpoint(None, None) is None
    paths = [_fake_checkpoint(run / f"checkpoint_2025-01-01_00-00-0{i}.000000", step=5 * (i + 1)) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        chosen = ckpt.choose_resume_checkpoint(None, str(run))
    assert Path(chosen.path) == paths[1]
    with chosen.as_directory() as d:
        assert ckpt.read_train_state(d).global_step == 10
    assert "Ray has no registered checkpoint" in caplog.text and "(step 10)" in caplog.text
    caplog.clear()

    (paths[1] / "lorafleet_manifest.rank1.json").unlink()  # the newest half-written: the older complete one
    assert Path(ckpt.choose_resume_checkpoint(None, str(run)).path) == paths[0]
    (paths[0] / "dcp" / "__0_0.distcp").write_bytes(b"")
    # Nothing complete (killed while writing the first one): step 0, said in the log, not an error.
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert ckpt.choose_resume_checkpoint(None, str(run)) is None
    assert "starting at step 0: no complete checkpoint" in caplog.text and "half-written" in caplog.text
