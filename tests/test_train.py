"""Training runs that are killed and resumed end where an uninterrupted run ends; misuse of run folders is
refused with a clear message. A tiny network is trained on the five committed real validation images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO

VALIDATION = REPO / "tests" / "data" / "validation"
CONFIG = {
    "seed": 0,
    "model": {"base_channels": 4, "depth": 2},
    "data": {"root": str(VALIDATION), "patch_size": 64},
    "batch_size": 2,
    "steps_per_epoch": 3,
    "epochs": 4,
    "eval_every": 2,
    "warmup_epochs": 1,
    "num_threads": 1,
    "snapshot_minutes": [],
}
TOLERANCE = {"atol": 1e-5, "rtol": 0.0}


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "nucleiseg.cli", "train", *map(str, args)]


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", env=env, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR:")]


def history(run_dir: Path) -> list[dict]:
    """history.csv without the wall-clock column."""
    with open(run_dir / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "minutes"} for row in csv.DictReader(f)]


def weights(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    return loaded[key] if key else loaded


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("train")
    config = tmp / "tiny.json"
    config.write_text(json.dumps(CONFIG))
    # one decoded-sample cache for all runs of this file
    return config, dict(os.environ, NUCLEISEG_CACHE=str(tmp / "cache"))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> Path:
    config, env = setup
    run_dir = tmp_path_factory.mktemp("run_a") / "run"
    result = run(train_cmd("--config", config, "--out", run_dir), env)
    assert result.returncode == 0, result.stderr
    assert [int(r["epoch"]) for r in history(run_dir)] == [1, 2, 3, 4]
    return run_dir


def test_killed_run_resumes_to_the_same_weights(setup, uninterrupted, tmp_path):
    config, env = setup
    run_dir = tmp_path / "run"
    process = subprocess.Popen(train_cmd("--config", config, "--out", run_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, encoding="utf-8", env=env)
    deadline = time.monotonic() + 90
    while not (run_dir / "checkpoint.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.01)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_after = weights(run_dir / "checkpoint.pt", "state")["epoch"]
    assert 1 <= killed_after < CONFIG["epochs"], "the run was killed before its last epoch"

    result = run(train_cmd("--out", run_dir, "--resume"), env)
    assert result.returncode == 0, result.stderr
    expected, resumed = weights(uninterrupted / "checkpoint.pt"), weights(run_dir / "checkpoint.pt")
    assert resumed["state"]["epoch"] == expected["state"]["epoch"] == CONFIG["epochs"]
    torch.testing.assert_close(resumed["network"], expected["network"], **TOLERANCE)
    torch.testing.assert_close(weights(run_dir / "model" / "weights.pt"),
                               weights(uninterrupted / "model" / "weights.pt"), **TOLERANCE)
    assert history(run_dir) == history(uninterrupted)  # same epochs, losses, learning rates and scores
    print(f"killed after epoch {killed_after}; resumed weights equal within {TOLERANCE}")


def test_training_into_an_existing_run_is_refused(setup, uninterrupted):
    config, env = setup
    before = (uninterrupted / "checkpoint.pt").read_bytes()
    result = run(train_cmd("--config", config, "--out", uninterrupted), env)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "already holds a training run" in errors[0] and "--resume" in errors[0]
    assert str(uninterrupted) in errors[0]
    assert (uninterrupted / "checkpoint.pt").read_bytes() == before


def test_resume_without_a_run_is_refused(setup, tmp_path):
    _, env = setup
    result = run(train_cmd("--out", tmp_path, "--resume"), env)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "nothing to resume" in errors[0]
    assert str(tmp_path / "checkpoint.pt") in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_finished_run_trains_longer_with_more_epochs(setup, uninterrupted, tmp_path):
    _, env = setup
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    result = run(train_cmd("--out", run_dir, "--resume", "--set", "epochs=6"), env)
    assert result.returncode == 0, result.stderr
    assert [int(r["epoch"]) for r in history(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 6
    assert history(run_dir)[:4] == history(uninterrupted)
