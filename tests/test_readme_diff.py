"""The README's diff turns transformers' image-classification example into a TL-Align one: it applies, and the
result trains and reports accuracy, offline.

The diff is read from README.md (the block after "Swap `Trainer` for `TLAlignTrainer`"), so the two cannot drift.
It is applied with `git apply` to `tests/assets/run_image_classification.py`, whose lines around each hunk are
upstream's exactly (tests/assets/README.md), and, when `TL_ALIGN_UPSTREAM_SCRIPT` names a copy of upstream's file,
to that file too. Each patched script runs as users run it: `python run_image_classification.py --flags`.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging import version

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tests" / "assets" / "run_image_classification.py"
UPSTREAM = os.environ.get("TL_ALIGN_UPSTREAM_SCRIPT")
IMPORT_LINE = "+from tl_align_hf import TLAlignCollator, TLAlignTrainer as Trainer, TLAlignConfig as TrainingArguments\n"
CONVERSION_NOTICE = "TLAlignTrainer got a plain TrainingArguments"


def readme_diff() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Swap `Trainer` for `TLAlignTrainer`") :]
    return re.search(r"```diff\n(.*?)```", section, re.DOTALL).group(1)


def collator_line_only_diff() -> str:
    """The README's diff for the user who keeps `TrainingArguments` (the README allows it): the same hunks, but
    `TrainingArguments` stays imported from transformers."""
    diff = readme_diff()
    assert diff.count(IMPORT_LINE) == 1 and diff.count("-    TrainingArguments,\n") == 1
    diff = diff.replace(IMPORT_LINE, "+from tl_align_hf import TLAlignCollator, TLAlignTrainer as Trainer\n")
    diff = diff.replace("-    TrainingArguments,\n", "     TrainingArguments,\n")
    header = re.search(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@\n(?=(?:.*\n){0,3}?     TrainingArguments,\n)", diff)
    old_start, old_count, new_start, new_count = map(int, header.groups())
    return diff.replace(header.group(0), f"@@ -{old_start},{old_count} +{new_start},{new_count + 1} @@\n", 1)


def allow_installed_transformers(script: Path) -> None:
    """Upstream's main asks for its own unreleased version (`check_min_version("X.dev0")`); users of a release take
    the script of their release tag (README). Where the copy under test asks for more than the installed release,
    that one line is commented out here, so the test checks the diff, not the version pin. The diff never needs it."""
    text = script.read_text()
    required = re.search(r'^check_min_version\("([^"]+)"\)', text, re.MULTILINE)
    if required and version.parse(required.group(1)) > version.parse(transformers.__version__):
        script.write_text(text.replace(required.group(0), f"# {required.group(0)}  (installed: {transformers.__version__})"))


def apply_diff(source: Path, diff: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    script = folder / "run_image_classification.py"
    script.write_text(source.read_text())
    (folder / "readme.diff").write_text(diff)
    result = subprocess.run(["git", "apply", "-p1", "readme.diff"], cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0, f"the README's diff does not apply to {source}:\n{result.stderr}"
    allow_installed_transformers(script)
    return script


SOURCES = [
    pytest.param(ASSET, id="asset"),
    pytest.param(
        Path(UPSTREAM or "unset"),
        id="upstream",
        marks=pytest.mark.skipif(not UPSTREAM, reason="TL_ALIGN_UPSTREAM_SCRIPT names no copy of upstream's script"),
    ),
]


@pytest.fixture(scope="module", params=SOURCES)
def source(request) -> Path:
    return request.param


def run_script(script: Path, digits: Path, checkpoint: Path, output_dir: Path, *flags: str) -> str:
    """Run `script` as a user does, offline, for 2 steps on 32 digits; its stdout and stderr."""
    command = [
        sys.executable, str(script), "--model_name_or_path", str(checkpoint),
        "--train_dir", str(digits / "train"), "--validation_dir", str(digits / "validation"),
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--max_train_samples", "32", "--max_eval_samples", "16",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=script.parent, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def trained_settings(output_dir: Path) -> dict:
    """Checks that the run trained with TL-Align and reported accuracy; the settings it trained with."""
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_top5_accuracy"} <= set(metrics) and 0 <= metrics["eval_accuracy"] <= 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logs) == 2 and all("aligned_lam" in entry for entry in logs)
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    return state["stateful_callbacks"]["TrainingRecord"]["args"]["settings"]


def test_readme_diff_applies_and_removes_the_hub_metric(source, tmp_path):
    text = apply_diff(source, readme_diff(), tmp_path / "patched").read_text()
    assert "import evaluate\n" not in text and "evaluate.load" not in text and "compute_metrics" not in text
    assert IMPORT_LINE[1:] in text and "    Trainer,\n" not in text and "    TrainingArguments,\n" not in text


def test_patched_script_trains_and_reports_accuracy(source, digits, tiny_checkpoint, tmp_path):
    script = apply_diff(source, readme_diff(), tmp_path / "patched")
    output_dir = tmp_path / "out"
    output = run_script(script, digits, tiny_checkpoint, output_dir, "--mixing_method", "cutmix")
    assert trained_settings(output_dir)["mixing_method"] == "cutmix"
    assert CONVERSION_NOTICE not in output


def test_collator_line_only_trains_with_plain_training_arguments(source, digits, tiny_checkpoint, tmp_path):
    """`TrainingArguments` kept: TLAlignTrainer and the collator convert it, the notice shows at `--log_level info`,
    and `--label_smoothing_factor` is applied as `label_smoothing` with one warning."""
    script = apply_diff(source, collator_line_only_diff(), tmp_path / "patched")
    assert "    TrainingArguments,\n" in script.read_text()
    output_dir = tmp_path / "out"
    output = run_script(
        script, digits, tiny_checkpoint, output_dir, "--log_level", "info", "--label_smoothing_factor", "0.05"
    )
    settings = trained_settings(output_dir)
    assert settings["mixing_method"] == "token_cutmix" and settings["label_smoothing"] == 0.05
    assert output.count(CONVERSION_NOTICE) == 1 and "label smoothing 0.05" in output
    assert output.count("label_smoothing_factor=0.05 is applied as label_smoothing=0.05") == 1


def _python_block_after(path: Path, heading: str) -> str:
    section = path.read_text()[path.read_text().index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.parametrize("document, heading", [("README.md", "## Mixing methods"), ("docs/mixing_methods.md", "## Mixing methods")])
def test_the_documented_mixing_examples_run(document, heading):
    """Every collator line of the docs' mixing examples builds a collator whose batches the model takes."""
    import torch
    from transformers import ViTForImageClassification

    from .tiny_models import IMAGE_SIZE, aligned_copy, tiny_model

    model = aligned_copy(tiny_model(ViTForImageClassification))
    code = _python_block_after(ROOT / document, heading)
    lines = [line for line in code.splitlines() if line.startswith("collator = ")]
    assert len(lines) == 6
    examples = [{"pixel_values": torch.rand(3, IMAGE_SIZE, IMAGE_SIZE), "label": i % 10} for i in range(4)]
    for line in lines:
        namespace = {"model": model}
        exec("from tl_align_hf import TLAlignCollator\n" + line, namespace)
        batch = namespace["collator"](examples)
        with torch.no_grad():
            assert model(batch["pixel_values"], **{k: batch[k] for k in ("mix_index", "token_weights", "mix_lam")}).aligned_lam.shape == (4,)
