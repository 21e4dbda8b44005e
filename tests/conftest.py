"""Shared fixtures: the real Data Science Bowl data beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DSB = REPO.parent / "shared" / "data" / "dsb2018"
TRAIN = DSB / "stage1_train"
TEST = DSB / "stage1_test"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the decoded-sample cache of the tests apart from the user's."""
    monkeypatch.setenv("NUCLEISEG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def train_root() -> Path:
    if not TRAIN.is_dir():
        pytest.fail(f"real training data not found at {TRAIN}")
    return TRAIN


@pytest.fixture(scope="session")
def real_samples(train_root):
    """Three real training images of different kinds (fluorescence, histology, large fluorescence)."""
    from nucleiseg.io import load_sample

    ids = [
        "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552",
        "0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed",
        "4ca5081854df7bbcaa4934fcf34318f82733a0f8c05b942c2265eea75419d62f",
    ]
    return [load_sample(train_root / i, overlap="warn") for i in ids]
