"""Where a job's state goes. Locally the work dir is $LORAFLEET_HOME or ./lorafleet-work; in Ray's
temporary copy of an uploaded working dir (`ray job submit --working-dir`) it must not be inside the
copy, and a relative output path is refused before anything runs. The copy's location is Ray's
layout (<session>/runtime_resources/working_dir_files/<package>), recreated here in a tmp dir;
tests/cluster/test_job_submit.py checks the same rule through a real `ray job submit`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.config import ConfigError, FinetuneConfig, default_work_dir, load_config
from lorafleet.config.base import is_relative_local_path, job_config, ray_working_dir_copy, refuse_relative_outputs
from lorafleet.config.sweep import SweepConfig
from lorafleet.tracking import resolve_tracking_uri
from testutils import REPO

FINETUNE = REPO / "jobs" / "configs" / "banking77-lora.yaml"
SWEEP = REPO / "jobs" / "configs" / "banking77-sweep.yaml"


@pytest.fixture
def ray_copy(tmp_path, monkeypatch):
    """The cwd a job's driver gets: Ray's unpacked copy of the upload (with a data file in it); HOME is a tmp dir."""
    copy = tmp_path / "ray" / "session_2026" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "data").mkdir(parents=True)
    (copy / "data" / "train.csv").write_text("text,category\nhello,greeting\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFLEET_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return copy


def test_local_runs_keep_the_current_directory_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAFLEET_HOME", raising=False)
    assert ray_working_dir_copy() is None
    assert default_work_dir() == tmp_path.resolve() / "lorafleet-work"
    monkeypatch.setenv("LORAFLEET_HOME", "elsewhere")
    assert default_work_dir() == tmp_path.resolve() / "elsewhere"


def test_in_a_ray_working_dir_copy_every_default_lands_in_the_home_work_dir(ray_copy, tmp_path, caplog):
    home_work = tmp_path / "home" / "lorafleet-work"
    assert ray_working_dir_copy() == ray_copy
    with caplog.at_level(logging.WARNING, logger="lorafleet.config"):
        assert default_work_dir() == home_work
    assert "LORAFLEET_HOME" in caplog.text and str(home_work) in caplog.text  # says where, and how to change it
    cfg = load_config(FinetuneConfig, FINETUNE, ["model.name_or_path=/models/base", "data.path=data/train.csv"])
    assert cfg.resolved_output_dir() == home_work / "outputs" / "banking77-lora"
    assert cfg.resolved_storage_path() == str(home_work / "ray_results")
    assert resolve_tracking_uri(cfg.tracking) == f"sqlite:///{home_work}/mlflow.db"
    sweep = load_config(SweepConfig, SWEEP, ["finetune.model.name_or_path=/models/base"])
    assert sweep.sweep.resolved_storage_path() == str(home_work / "tune_results")
    for p in (cfg.resolved_output_dir(), Path(cfg.resolved_storage_path())):
        assert ray_copy not in p.parents


def test_in_a_ray_working_dir_copy_lorafleet_home_must_be_absolute(ray_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "shared"))
    assert default_work_dir() == tmp_path / "shared"
    monkeypatch.setenv("LORAFLEET_HOME", "lorafleet-work")
    with pytest.raises(ValueError, match=r"LORAFLEET_HOME='lorafleet-work' is a relative path.*absolute path"):
        default_work_dir()


def test_relative_outputs_are_refused_in_a_ray_working_dir_copy_and_inputs_are_not(ray_copy, tmp_path, monkeypatch, capsys):
    ok = ["model.name_or_path=/models/base", "data.path=data/train.csv", f"output_dir={tmp_path}/out",
          "checkpoint.storage_path=s3://bucket/ray", "tracking.mlflow_tracking_uri=http://mlflow:5000"]
    argv = ["--config", str(FINETUNE), *[a for s in ok for a in ("--set", s)]]
    assert job_config(FinetuneConfig, "", argv).data.path == "data/train.csv"  # inputs inside the upload are fine

    bad = ["output_dir=out/banking77", "checkpoint.storage_path=ray_results", "tracking.mlflow_tracking_uri=sqlite:///lorafleet-work/mlflow.db",
           "tracking.mlflow_artifact_location=./mlartifacts"]
    with pytest.raises(SystemExit) as exc:
        job_config(FinetuneConfig, "", argv + [a for s in bad for a in ("--set", s)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err and str(ray_copy) in err and "absolute path" in err, err
    for key in ("output_dir: 'out/banking77'", "checkpoint.storage_path: 'ray_results'", "tracking.mlflow_tracking_uri: 'sqlite:///lorafleet-work",
                "tracking.mlflow_artifact_location: './mlartifacts'"):
        assert key in err, (key, err)

    sweep = load_config(SweepConfig, SWEEP, ["finetune.model.name_or_path=/m", "sweep.storage_path=tune", "finetune.output_dir=out"])
    with pytest.raises(ConfigError) as refused:
        refuse_relative_outputs(sweep, "sweep.yaml")
    assert [e.split(":")[0] for e in refused.value.errors] == ["sweep.storage_path", "finetune.output_dir"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.setenv("LORAFLEET_HOME", "lorafleet-work")
    with pytest.raises(ConfigError) as refused:
        refuse_relative_outputs(load_config(FinetuneConfig, FINETUNE, ok), "x.yaml")
    assert [e.split(":")[0] for e in refused.value.errors] == ["$LORAFLEET_HOME", "$MLFLOW_TRACKING_URI"]


def test_the_same_relative_outputs_are_fine_outside_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refuse_relative_outputs(load_config(FinetuneConfig, FINETUNE, ["model.name_or_path=m", "output_dir=out"]), "x.yaml")


@pytest.mark.parametrize("value,relative", [
    ("out", True), ("./out", True), ("/abs/out", False), ("~/out", False), ("sqlite:///lorafleet-work/mlflow.db", True),
    ("sqlite:////abs/mlflow.db", False), ("sqlite:///:memory:", False), ("file:./mlruns", True), ("file:///abs/mlruns", False),
    ("s3://b/k", False), ("gs://b/k", False), ("http://mlflow:5000", False), ("postgresql://u@h/db", False), ("databricks", False),
])
def test_what_counts_as_a_relative_output(value, relative):
    assert is_relative_local_path(value) is relative


def test_the_job_script_refuses_before_anything_runs(ray_copy):
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "finetune.py"), "--config", str(FINETUNE),
                           "--set", "model.name_or_path=/models/base", "--set", "output_dir=out"],
                          cwd=ray_copy, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "output_dir: 'out' is a relative path" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in ray_copy.iterdir()) == ["data"]  # nothing written into the copy


def test_inputs_in_the_upload_do_not_change_the_resume_fingerprint_when_the_upload_does(tmp_path, monkeypatch):
    """Ray names its copy by a hash of the whole upload: an edit anywhere in the folder moves
    data.path, but a re-submission of the same command must still resume its run."""
    from lorafleet.train.trainer import config_fingerprint, resolve_local_paths

    prints = []
    for pkg in ("_ray_pkg_0123abcd", "_ray_pkg_4567ef01"):
        copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / pkg
        (copy / "data").mkdir(parents=True)
        (copy / "data" / "train.csv").write_text("text,category\nhello,greeting\n")
        monkeypatch.chdir(copy)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        cfg = resolve_local_paths(load_config(FinetuneConfig, FINETUNE, ["model.name_or_path=/models/base", "data.path=data/train.csv"]))
        assert cfg.data.path == str(copy / "data" / "train.csv")
        prints.append(config_fingerprint(cfg))
    changed = load_config(FinetuneConfig, FINETUNE, ["model.name_or_path=/models/base", "data.path=data/train.csv", "lora.r=4"])
    assert prints[0] == prints[1] != config_fingerprint(resolve_local_paths(changed))
