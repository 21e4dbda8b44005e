import json
import subprocess
import sys

import pytest

from nucleiseg.cli import get_parser, main
from nucleiseg.io import load_dataset, write_labels
from nucleiseg.rle import write_submission

from .conftest import REPO

VALIDATION = REPO / "tests" / "data" / "validation"


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nucleiseg.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_parser_has_every_command():
    choices = get_parser()._subparsers._group_actions[0].choices
    assert set(choices) == {"export", "segment", "benchmark", "train", "tune", "evaluate", "show", "seed"}


@pytest.mark.parametrize("kind", ["folder", "csv"])
def test_evaluate_ground_truth_against_itself_scores_one(tmp_path, kind, capsys):
    samples = load_dataset(VALIDATION, progress=False)
    if kind == "folder":
        for s in samples:
            write_labels(tmp_path / f"{s.id}.png", s.labels)
        predictions = tmp_path
    else:
        predictions = tmp_path / "submission.csv"
        write_submission(predictions, [(s.id, s.labels) for s in samples])
    assert main(["evaluate", str(predictions), "--truth", str(VALIDATION), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 5 and report["n_true"] == report["n_pred"] > 100
    for key in ("dsb_score", "ap50", "ap75", "f1_50", "precision50", "recall50", "mean_matched_iou"):
        assert report[key] == 1.0, key


def test_evaluate_missing_predictions_score_zero(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--truth", str(VALIDATION), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dsb_score"] == 0.0


def test_errors_are_one_line_and_exit_nonzero(tmp_path):
    out = run_cli("evaluate", tmp_path / "nothing", "--truth", tmp_path / "missing")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "missing" in out.stderr


def test_segment_help_shows_the_inference_defaults():
    from nucleiseg.config import InferenceConfig

    text = " ".join(get_parser()._subparsers._group_actions[0].choices["segment"].format_help().split())
    defaults = InferenceConfig()
    assert f"as long is one tile) (default: {defaults.tile})" in text
    assert f"(default: {defaults.max_megapixels})" in text
    assert "--outputs OUTPUTS comma-separated outputs per image, among labels, overlay, csv" in text
