"""The README's diff turns a script of upstream's structure into a TL-Align one: it applies, and the result trains.

The diff is read from README.md (the block after "Swap `Trainer` for `TLAlignTrainer`"), so the two cannot drift.
"""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tests" / "assets" / "run_image_classification.py"


def readme_diff() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Swap `Trainer` for `TLAlignTrainer`") :]
    return re.search(r"```diff\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def patched_script(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("upstream")
    shutil.copy(ASSET, folder / ASSET.name)
    (folder / "readme.diff").write_text(readme_diff())
    result = subprocess.run(["git", "apply", "-p1", "readme.diff"], cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return folder / ASSET.name


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"patched_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_diff_applies_and_removes_the_hub_metric(patched_script):
    text = patched_script.read_text()
    assert "import evaluate\n" not in text and "metric = evaluate.load" not in text and "compute_metrics" not in text
    assert "from tl_align_hf import TLAlignCollator, TLAlignTrainer as Trainer" in text


@pytest.mark.parametrize("label_column_name", ["label", "digit"])
def test_patched_script_trains_with_the_label_column_it_uses(patched_script, digits, tiny_checkpoint, tmp_path, label_column_name):
    script = _load(patched_script)
    output_dir = tmp_path / "out"
    trainer, metrics = script.main([
        "--model_name_or_path", str(tiny_checkpoint),
        "--train_dir", str(digits / "train"), "--validation_dir", str(digits / "validation"),
        "--label_column_name", label_column_name,
        "--output_dir", str(output_dir), "--do_train", "--do_eval",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--max_train_samples", "32",
        "--max_eval_samples", "16", "--logging_steps", "1", "--report_to", "none", "--use_cpu",
        "--mixing_method", "cutmix",
    ])  # fmt: skip
    assert type(trainer).__name__ == "TLAlignTrainer"
    assert {"eval_accuracy", "eval_top5_accuracy"} <= set(metrics)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("aligned_lam" in entry for entry in logs)
    assert json.loads((output_dir / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]


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
