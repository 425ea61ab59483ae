"""scripts/accuracy_study.py: the statistics, and a tiny end-to-end run of all six methods (< 60 s on CPU)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import accuracy_study as study  # noqa: E402

pytest.importorskip("matplotlib")


def test_summarize_gives_t_interval():
    summary = study.summarize([0.90, 0.92, 0.94])
    assert summary["n"] == 3
    assert summary["mean"] == pytest.approx(0.92)
    assert summary["std"] == pytest.approx(0.02)
    # t(0.975, 2) = 4.3027; half width = 4.3027 * 0.02 / sqrt(3)
    assert summary["ci95_high"] - summary["mean"] == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)


def test_seeds_needed_grows_with_spread():
    assert study.seeds_needed(2 * 0.01**2, 0.01) == 16  # 2 * (1.96 + 0.84)^2 = 15.7
    assert study.seeds_needed(2 * 0.02**2, 0.01) == 63
    assert study.seeds_needed(2 * 0.01**2, 0.0) == math.inf


def test_compare_pairs_runs_by_seed():
    runs = [{"method": "cutmix", "seed": s, "accuracy": a} for s, a in enumerate([0.80, 0.90, 0.70])]
    runs += [{"method": "cutmix+tl", "seed": s, "accuracy": a} for s, a in enumerate([0.81, 0.92, 0.73])]
    result = study.compare(runs, "cutmix", "cutmix+tl")
    assert result["difference"] == pytest.approx(0.02)
    assert result["seeds_better"] == 3
    assert result["paired_p"] < result["welch_p"]  # the pairing removes the between-seed spread


def test_fixed_split_is_stratified():
    train, test = study.digits_splits()
    assert (len(train), len(test)) == (1347, 450)
    assert sorted(set(test["label"])) == list(range(10))
    assert train[0]["image"].size == (study.IMAGE_SIZE, study.IMAGE_SIZE)
    assert study.IMAGE_SIZE // study.PATCH_SIZE >= 8


def test_quick_study_writes_table_json_and_chart(tmp_path):
    argv = ["--quick", "--seeds", "2", "--epochs", "1", "--train-limit", "96", "--output-dir", str(tmp_path)]
    payload = study.main(argv)

    saved = json.loads((tmp_path / "accuracy_study.json").read_text())
    assert saved == payload
    assert len(saved["runs"]) == 2 * len(study.METHODS)
    assert {(run["method"], run["seed"]) for run in saved["runs"]} == {(m, s) for m in study.METHODS for s in (0, 1)}
    for run in saved["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert 0.0 <= run["top5_accuracy"] <= 1.0
    assert list(saved["summary"]) == list(study.METHODS)
    for row in saved["summary"].values():
        assert set(row) == {"n", "mean", "std", "ci95_low", "ci95_high"}
        assert row["n"] == 2 and 0.0 <= row["mean"] <= 1.0
        assert row["ci95_low"] <= row["mean"] <= row["ci95_high"]

    doc = (tmp_path / "accuracy.md").read_text()
    assert "<!-- accuracy-study:begin -->" in doc and "<!-- accuracy-study:end -->" in doc
    assert "| method | seeds | mean acc. (%) | std (%) | 95% CI (%) |" in doc
    assert "| mixup+tl vs mixup |" in doc
    assert (tmp_path / "img" / "accuracy_study.png").stat().st_size > 0

    # A second call resumes: every run is already saved, nothing is trained again.
    assert study.main(argv)["runs"] == saved["runs"]
