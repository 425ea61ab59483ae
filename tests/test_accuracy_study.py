"""scripts/accuracy_study.py (runner) and accuracy_report.py: the statistics, the tuning mode, the eager-attention
pairing, the report regenerated from the committed runs, and a tiny end-to-end run of all seven arms (about a minute
on one CPU thread)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import accuracy_common as common  # noqa: E402
import accuracy_report as report  # noqa: E402
import accuracy_study as study  # noqa: E402

pytest.importorskip("matplotlib")

TINY = ["--seeds", "2", "--epochs", "2", "--train-limit", "64", "--set", "test_limit=100"]


def test_summarize_gives_t_interval():
    summary = report.summarize([0.90, 0.92, 0.94])
    assert summary["n"] == 3
    assert summary["mean"] == pytest.approx(0.92)
    assert summary["std"] == pytest.approx(0.02)
    # t(0.975, 2) = 4.3027; half width = 4.3027 * 0.02 / sqrt(3)
    assert summary["ci95_high"] - summary["mean"] == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)


def test_seeds_needed_grows_with_spread():
    assert report.seeds_needed(2 * 0.01**2, 0.01) == 16  # 2 * (1.96 + 0.84)^2 = 15.7
    assert report.seeds_needed(2 * 0.02**2, 0.01) == 63
    assert report.seeds_needed(2 * 0.01**2, 0.0) == math.inf
    assert report.seeds_needed(2 * 0.01**2, -1.4e-17) == math.inf  # rounding of a zero mean difference


def runs_of(arm: str, accuracies: list[float]) -> list[dict]:
    return [{"method": arm, "seed": seed, "accuracy": value} for seed, value in enumerate(accuracies)]


def test_compare_pairs_runs_by_seed():
    runs = runs_of("cutmix", [0.80, 0.90, 0.70, 0.75, 0.60]) + runs_of("cutmix+tl", [0.81, 0.92, 0.73, 0.75, 0.59])
    result = report.compare(runs, "cutmix", "cutmix+tl")
    differences = [0.01, 0.02, 0.03, 0.0, -0.01]
    assert result["differences"] == pytest.approx(differences)
    assert result["mean_difference"] == pytest.approx(0.01)
    assert (result["wins"], result["losses"], result["ties"]) == (3, 1, 1)
    assert result["sign_test_p"] == pytest.approx(0.625)  # binomial(4, 1/2): P(<= 1 or >= 3) = 10/16
    interval = report.summarize(differences)
    assert (result["ci95_low"], result["ci95_high"]) == pytest.approx((interval["ci95_low"], interval["ci95_high"]))
    assert 0.0 < result["paired_t_p"] < 1.0
    assert result["seeds_for_80_power"] == report.seeds_needed(interval["std"] ** 2, 0.01)
    assert report.compare(runs_of("cutmix", [0.8]) + runs_of("cutmix+tl", [0.9]), "cutmix", "cutmix+tl") is None


def comparison(low: float, high: float) -> dict:
    return {
        "baseline": "cutmix", "treatment": "cutmix+tl", "n": 10, "mean_difference": (low + high) / 2,
        "ci95_low": low, "ci95_high": high, "wins": 5, "losses": 4, "ties": 1, "sign_test_p": 1.0,
        "paired_t_p": 0.5, "seeds_for_80_power": 40,
    }  # fmt: skip


def test_verdict_says_what_the_interval_rules_out():
    text = report.verdict(comparison(-0.012, 0.034), "TL-Align")
    assert "does not cost more than 1.20 points here" in text and "does not gain more than 3.40" in text
    assert "about 40 seeds for 80% power" in text
    assert "gains here: at least 0.50 and at most 2.00" in report.verdict(comparison(0.005, 0.02), "TL-Align")
    assert "costs here: at least 0.50 and at most 2.00" in report.verdict(comparison(-0.02, -0.005), "TL-Align")


def test_timing_splits_a_resumed_study_into_sittings():
    def run(start, finish, cpu):
        return {"started": f"2026-12-02T{start}:00+00:00", "finished": f"2026-12-02T{finish}:00+00:00",
                "wall_s": 60.0, "cpu": cpu, "process": "0/1"}  # fmt: skip

    # Two overlapping runs, a third 5 minutes after them (same sitting), then one 5 hours later on another CPU.
    runs = [run("10:00", "10:10", "A"), run("10:02", "10:12", "A"), run("10:17", "10:30", "A"), run("15:30", "15:40", "B")]
    result = report.timing(runs)
    assert [(item["runs"], item["span_s"], item["cpus"]) for item in result["sittings"]] == [
        (3, 1800.0, ["A"]),
        (1, 600.0, ["B"]),
    ]
    assert result["span_s"] == 2400.0  # the sittings' wall time, not the 5.7 h from first start to last finish
    assert result["cpus"] == {"A": 3, "B": 1} and result["mean_wall_s_per_cpu"] == {"A": 60.0, "B": 60.0}
    text = report.timing_text(result)
    assert "0.67 h in 2 sitting(s)" in text and "2026-12-02 15:30 to 15:40 UTC, 1 runs, 0.17 h (B)" in text


def test_fixed_split_is_stratified():
    settings = common.StudySettings()
    train, test = common.digits_splits(settings.image_size)
    assert (len(train), len(test)) == (common.TRAIN_IMAGES, common.TEST_IMAGES) == (1347, 450)
    assert sorted(set(test["label"])) == list(range(10))
    assert train[0]["image"].size == (settings.image_size, settings.image_size)
    assert settings.image_size // settings.patch_size >= 4  # a patch grid that a box can cut


def test_patches_must_tile_the_image():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        common.StudySettings(image_size=30, patch_size=4)


def test_study_defaults_and_quick_mode_stays_out_of_docs():
    parser = study.make_parser()
    settings, _, seeds, arms, output_dir, runs_dir = common.study_plan(parser, parser.parse_args([]))
    assert settings == common.StudySettings() and settings.attn_implementation == "eager"
    assert len(seeds) >= 10 and arms == list(common.ARMS)
    _, _, tuning_seeds, _, _, _ = common.study_plan(parser, parser.parse_args(["--tune", "t", "--seeds", "10"]))
    assert not set(seeds) & set(tuning_seeds)  # the study never reports a run its settings were tuned on
    assert runs_dir == common.REPO / "docs" / "data" / "accuracy_study_runs"  # kept by the repository, not outputs/
    settings, _, seeds, arms, output_dir, runs_dir = common.study_plan(parser, parser.parse_args(["--quick"]))
    assert output_dir == common.REPO / "outputs" / "accuracy-quick" and runs_dir.is_relative_to(output_dir)
    assert settings.epochs == 2 and settings.train_limit is not None and arms == list(common.ARMS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.epochs = 3


def test_report_regenerates_the_committed_study_from_the_committed_runs(tmp_path):
    """The report alone, on docs/data/accuracy_study_runs: the same JSON, byte for byte, as docs/accuracy_study.json,
    and the same generated section as docs/accuracy.md (but the aggregation date)."""
    runs_dir = common.REPO / "docs" / "data" / "accuracy_study_runs"
    written = report.main(["--output-dir", str(tmp_path), "--runs-dir", str(runs_dir), "--section", "study"])
    committed = common.REPO / "docs" / "accuracy_study.json"
    assert (tmp_path / "accuracy_study.json").read_text() == committed.read_text()
    assert written == {"study": json.loads(committed.read_text())}
    section = (tmp_path / "accuracy.md").read_text().split("<!-- accuracy-study:begin -->")[1]
    committed_section = (common.REPO / "docs" / "accuracy.md").read_text().split("<!-- accuracy-study:begin -->")[1]
    drop_date = re.compile(r" Aggregated \d{4}-\d{2}-\d{2}\.")
    # The commands name the plan: the committed section was aggregated with the default output and runs folders.
    section = section.replace(f" --output-dir {tmp_path} --runs-dir {runs_dir}", "")
    committed_section = committed_section.split("<!-- accuracy-study:end -->")[0]
    assert drop_date.sub("", section.split("<!-- accuracy-study:end -->")[0]) == drop_date.sub("", committed_section)
    assert not (tmp_path / "accuracy.md").read_text().count("accuracy-tuning")  # --section study: only that one


def test_tuning_refuses_tl_align_arms_and_unknown_fields(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--tune", "t", "--methods", "cutmix", "cutmix+tl", "--tuning-dir", str(tmp_path)])
    assert "only the plain arms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--tune", "t", "--set", "learning_rat=1e-3", "--tuning-dir", str(tmp_path)])
    assert "FIELD one of" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tuning_run_is_recorded_in_the_doc(tmp_path, capsys):
    tuning_dir = tmp_path / "tuning"
    argv = ["--tune", "lr1e-3", "--methods", "none", "--seeds", "1", "--epochs", "1", "--train-limit", "32",
            "--set", "learning_rate=1e-3", "test_limit=32", "--tuning-dir", str(tuning_dir), "--output-dir", str(tmp_path)]  # fmt: skip
    study.main(argv)
    assert (tuning_dir / "lr1e-3" / "tuning.json").exists() and (tuning_dir / "lr1e-3" / "none-seed0.json").exists()
    doc = (tmp_path / "accuracy.md").read_text()
    assert "<!-- accuracy-tuning:begin -->" in doc
    row = next(line for line in doc.splitlines() if line.startswith("| lr1e-3 |"))
    assert "learning_rate=0.001" in row and "epochs=1" in row
    # The same name with other settings is refused instead of mixing two configurations.
    with pytest.raises(SystemExit):
        study.main([token if token != "learning_rate=1e-3" else "learning_rate=2e-3" for token in argv])
    assert "choose a new name" in capsys.readouterr().err


def test_mixup_pair_first_step_logits_are_bit_identical():
    """Eager attention everywhere: the aligned arm's share computation reuses the very probabilities the plain arm
    computes, so at the same seed both arms see the same batch and produce the same logits, bit for bit."""
    settings = replace(common.StudySettings(), train_limit=64, test_limit=16)
    train, test = common.digits_splits(settings.image_size, settings.train_limit, settings.test_limit)
    with tempfile.TemporaryDirectory() as work_dir:
        plain_batch, plain = study.first_step_outputs("mixup", 0, settings, train, test, work_dir)
        aligned_batch, aligned = study.first_step_outputs("mixup+tl", 0, settings, train, test, work_dir)
    for key in ("pixel_values", "labels", "mix_index", "token_weights", "mix_lam"):
        assert torch.equal(plain_batch[key], aligned_batch[key]), key
    assert torch.equal(plain.logits, aligned.logits)
    assert torch.allclose(aligned.aligned_lam, aligned_batch["mix_lam"], atol=1e-6)  # Mixup: equal targets


def test_quick_study_writes_json_curves_comparisons_and_figure(tmp_path):
    argv = ["--quick", *TINY, "--output-dir", str(tmp_path)]
    payload = study.main(argv)

    saved = json.loads((tmp_path / "accuracy_study.json").read_text())
    assert saved == payload
    assert {(run["method"], run["seed"]) for run in saved["runs"]} == {(a, s) for a in common.ARMS for s in (0, 1)}
    assert len(saved["runs"]) == 2 * len(common.ARMS)
    for run in saved["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["accuracy"] == pytest.approx(run["curves"]["test_accuracy"][-1], abs=1e-6)
        expected = {"train_loss", "mix_lam", "test_accuracy", "test_loss"}
        expected |= {"aligned_lam", "alignment_gap"} if run["tl_align"] else set()
        assert expected <= set(run["curves"])
        assert all(len(run["curves"][name]) == 2 for name in expected)
        steps_per_epoch = math.ceil(64 / common.StudySettings().batch_size)  # TINY: 64 training images, 2 epochs
        assert run["train_steps"] == 2 * steps_per_epoch and run["started"] <= run["finished"]
    assert list(saved["summary"]) == list(common.ARMS)
    for row in saved["summary"].values():
        assert set(row) == {"n", "mean", "std", "ci95_low", "ci95_high"} and row["n"] == 2
    assert [(c["baseline"], c["treatment"]) for c in saved["comparisons"]] == list(common.PAIRS)
    for row in saved["comparisons"] + saved["mixing_comparisons"]:
        assert {"mean_difference", "ci95_low", "ci95_high", "wins", "losses", "ties", "sign_test_p", "paired_t_p",
                "seeds_for_80_power"} <= set(row)  # fmt: skip
        assert row["wins"] + row["losses"] + row["ties"] == row["n"] == 2
    assert set(saved["alignment"]) == set(common.TL_ARMS)
    assert saved["timing"]["runs"] == 14 and saved["timing"]["span_s"] >= 0
    assert saved["timing"]["cpus"] == {study.cpu_model(): 14} and all(run["cpu"] for run in saved["runs"])

    doc = (tmp_path / "accuracy.md").read_text()
    assert "<!-- accuracy-study:begin -->" in doc and "<!-- accuracy-study:end -->" in doc
    assert "| token_cutmix+tl vs token_cutmix |" in doc and "| mixup+tl vs mixup |" in doc
    assert "--workers 2 --worker $w" in doc
    assert (tmp_path / "img" / "accuracy_study.png").stat().st_size > 0

    # A second call resumes: every run is already saved, nothing is trained again.
    assert study.main(argv)["runs"] == saved["runs"]
