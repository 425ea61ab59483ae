"""Publishing to the Hub, end to end: the real huggingface_hub / transformers clients against the local Hub of
tests/hub_server.py (no network).

In this process, `push_checkpoint_to_hub` reaches the local Hub through `patch_client_in_process` (it makes a new
`HfApi` per call, which reads `huggingface_hub.constants.ENDPOINT`). Everything transformers does
(`from_pretrained(repo_id)`, `Trainer.push_to_hub`) runs in a fresh subprocess configured by environment variables
only (`HF_ENDPOINT`, read at import), as a user configures a private Hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from transformers import ViTConfig, ViTImageProcessor

from tests.hub_server import FAKE_TOKEN, FAKE_USER, HubServer, patch_client_in_process
from tl_align_hf import TLAlignViTForImageClassification, push_checkpoint_to_hub
from tl_align_hf.support.model_card import model_card

REPO_ID = f"{FAKE_USER}/tiny-vit-tl-align"
MIXING = {"mixing_method": "token_cutmix", "cutmix_alpha": 1.0, "mixup_alpha": 0.0, "mix_prob": 1.0, "mix_mode": "batch"}
SUBPROCESS_TIMEOUT_S = 120

# Runs in a fresh interpreter that cannot import tl_align_hf: loads the pushed repo with plain transformers and
# compares it with the reference saved by the test (state dict, logits on fixed pixels).
LOAD_WITH_PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    sys.modules["tl_align_hf"] = None  # any import of our package now fails
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    repo_id, reference_path = sys.argv[1], sys.argv[2]
    reference = torch.load(reference_path, weights_only=True)
    model, info = AutoModelForImageClassification.from_pretrained(repo_id, output_loading_info=True)
    processor = AutoImageProcessor.from_pretrained(repo_id)
    state = model.state_dict()
    with torch.no_grad():
        logits = model.eval()(pixel_values=reference["pixel_values"]).logits
    print(json.dumps({
        "class": type(model).__name__,
        "architectures": model.config.architectures,
        "loading_info": {key: sorted(map(str, value)) for key, value in info.items()},
        "same_keys": sorted(state) == sorted(reference["state_dict"]),
        "weights_equal": all(torch.equal(state[k], v) for k, v in reference["state_dict"].items() if k in state),
        "logits_max_abs_diff": (logits - reference["logits"]).abs().max().item(),
        "processor_size": dict(processor.size),
        "tl_align_hf_imported": sys.modules.get("tl_align_hf") is not None,
    }))
    """
)

# Runs in a fresh interpreter: plain Trainer with push_to_hub=True on a tiny model, then push_to_hub().
TRAINER_PUSH = textwrap.dedent(
    """
    import json, sys
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    output_dir, repo_id, token = sys.argv[1:4]
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=10)
    args = TrainingArguments(output_dir=output_dir, push_to_hub=True, hub_model_id=repo_id, hub_token=token,
                             report_to="none", hub_strategy="end", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=ViTForImageClassification(config), args=args)
    commit = trainer.push_to_hub(commit_message="End of training")
    print(json.dumps({"commit_url": commit.commit_url, "oid": commit.oid}))
    """
)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh local Hub for one test, stopped at teardown; this process's new `HfApi()`s and the subprocesses of
    `run_python` reach it, with caches and token file under `tmp_path` and no token set. Teardown fails the test if
    the client called an endpoint the server does not serve."""
    with HubServer(max_lifetime_s=300) as server:
        patch_client_in_process(monkeypatch, server.url, tmp_path / "hf_home")
        yield server
    assert not server.hub.unhandled, f"the client needed endpoints the local Hub lacks: {server.hub.unhandled}"


def tiny_model() -> TLAlignViTForImageClassification:
    """A tiny aligned ViT (16 px images, 4 px patches, 2 layers, 10 labels) with fixed weights."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    return TLAlignViTForImageClassification(config).eval()


def write_card(folder: Path, metrics: dict) -> None:
    """The model card of the tiny model, as the no-Trainer example script writes it."""
    card = model_card(
        model_class_name="TLAlignViTForImageClassification",
        mixing=MIXING,
        tl_align=True,
        label_smoothing=0.1,
        dataset="digits",
        eval_results=metrics,
        repo_id=REPO_ID,
    )
    card.save(folder / "README.md")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A saved output folder: model, image processor, card, plus a Trainer `checkpoint-1/` and `runs/` to skip.

    `reference.pt` (next to the folder) holds the model's state dict and its logits on fixed pixels.
    """
    model = tiny_model()
    folder = tmp_path / "output"
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    write_card(folder, {"eval_accuracy": 0.5, "eval_top5_accuracy": 0.9, "eval_loss": 1.7})
    for skipped in ("checkpoint-1/model.safetensors", "runs/events.out.tfevents.1"):
        (folder / skipped).parent.mkdir(parents=True, exist_ok=True)
        (folder / skipped).write_bytes(b"not for the Hub")
    pixel_values = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    reference = {"state_dict": model.state_dict(), "pixel_values": pixel_values, "logits": logits}
    torch.save(reference, tmp_path / "reference.pt")
    return folder


def run_python(code: str, *args: str | Path, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter with this process's (patched) environment; its last stdout line as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    if result.returncode != 0:
        pytest.fail(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_push_checkpoint_loads_with_plain_transformers(hub: HubServer, checkpoint: Path, tmp_path: Path):
    commit_url = push_checkpoint_to_hub(checkpoint, REPO_ID, token=FAKE_TOKEN)

    head = hub.hub.commits(REPO_ID)[0]
    assert commit_url == f"{hub.url}/{REPO_ID}/commit/{head.oid}"
    assert head.files["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    loaded = run_python(LOAD_WITH_PLAIN_TRANSFORMERS, REPO_ID, tmp_path / "reference.pt", cwd=tmp_path)
    assert loaded["class"] == "ViTForImageClassification"
    assert loaded["architectures"] == ["ViTForImageClassification"]
    assert all(not keys for keys in loaded["loading_info"].values()), loaded["loading_info"]
    assert loaded["same_keys"] and loaded["weights_equal"]
    assert loaded["logits_max_abs_diff"] < 1e-6
    assert loaded["processor_size"] == {"height": 16, "width": 16}
    assert not loaded["tl_align_hf_imported"]


def test_push_checkpoint_sends_card_and_skips_trainer_folders(hub: HubServer, checkpoint: Path):
    push_checkpoint_to_hub(checkpoint, REPO_ID, token=FAKE_TOKEN)

    files = HfApi(endpoint=hub.url).list_repo_files(REPO_ID)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert not [path for path in files if path.startswith(("checkpoint-", "runs/"))]
    card = ModelCard(hub.hub.file(REPO_ID, "README.md").decode())
    assert card.data.library_name == "transformers"
    assert {"image-classification", "vision", "tl-align", "token-label-alignment"} <= set(card.data.tags)
    assert card.data.eval_results[0].metric_value == 0.5
    assert f'AutoModelForImageClassification.from_pretrained("{REPO_ID}")' in card.text


def test_second_push_creates_second_commit(hub: HubServer, checkpoint: Path):
    first = push_checkpoint_to_hub(checkpoint, REPO_ID, token=FAKE_TOKEN, commit_message="First push")
    write_card(checkpoint, {"eval_accuracy": 0.75})
    second = push_checkpoint_to_hub(checkpoint, REPO_ID, token=FAKE_TOKEN, commit_message="Second push")
    unchanged = push_checkpoint_to_hub(checkpoint, REPO_ID, token=FAKE_TOKEN, commit_message="Nothing new")

    commits = hub.hub.commits(REPO_ID)
    assert [commit.title for commit in commits] == ["Second push", "First push", "initial commit"]
    assert first != second and unchanged == second
    assert set(commits[0].files) == set(commits[1].files)
    assert ModelCard(commits[0].files["README.md"].decode()).data.eval_results[0].metric_value == 0.75


def test_push_checkpoint_to_branch(hub: HubServer, checkpoint: Path):
    push_checkpoint_to_hub(checkpoint, REPO_ID, token=FAKE_TOKEN, revision="experiment")

    assert "model.safetensors" in hub.hub.commits(REPO_ID, revision="experiment")[0].files
    assert list(hub.hub.commits(REPO_ID)[0].files) == [".gitattributes"]


def test_push_with_bare_name_goes_to_the_token_namespace(hub: HubServer, checkpoint: Path):
    push_checkpoint_to_hub(checkpoint, "bare-name", token=FAKE_TOKEN)

    user = HfApi(endpoint=hub.url, token=FAKE_TOKEN).whoami()["name"]
    assert list(hub.hub.repos) == [f"{user}/bare-name"]


@pytest.mark.parametrize(
    ("token", "message"), [(None, "no token was sent"), ("hf_not_a_valid_token", "Invalid credentials")]
)
def test_raises_error_when_token_is_missing_or_invalid(hub: HubServer, checkpoint: Path, token, message):
    with pytest.raises(HfHubHTTPError, match=message) as error:
        push_checkpoint_to_hub(checkpoint, REPO_ID, token=token)

    assert error.value.response.status_code == 401
    assert hub.hub.repos == {}


def test_raises_error_when_pushing_to_existing_repo_without_valid_token(hub: HubServer, checkpoint: Path):
    HfApi(endpoint=hub.url, token=FAKE_TOKEN).create_repo(REPO_ID)

    with pytest.raises(HfHubHTTPError) as error:
        push_checkpoint_to_hub(checkpoint, REPO_ID, token="hf_not_a_valid_token")

    assert error.value.response.status_code == 401
    assert len(hub.hub.commits(REPO_ID)) == 1


def test_raises_error_when_namespace_is_not_the_token_owner(hub: HubServer, checkpoint: Path):
    with pytest.raises(HfHubHTTPError) as error:
        push_checkpoint_to_hub(checkpoint, "someone-else/model", token=FAKE_TOKEN)

    assert error.value.response.status_code == 403
    assert hub.hub.repos == {}


def test_raises_error_when_folder_is_missing(hub: HubServer, tmp_path: Path):
    with pytest.raises(NotADirectoryError, match="save_pretrained"):
        push_checkpoint_to_hub(tmp_path / "missing", REPO_ID, token=FAKE_TOKEN)


def test_trainer_push_to_hub(hub: HubServer, tmp_path: Path):
    repo_id = f"{FAKE_USER}/trainer-push"

    pushed = run_python(TRAINER_PUSH, tmp_path / "trainer_output", repo_id, FAKE_TOKEN, cwd=tmp_path)

    commits = hub.hub.commits(repo_id)
    assert pushed["oid"] == commits[0].oid and commits[0].title == "End of training"
    assert {"config.json", "model.safetensors", "README.md", "training_args.bin"} <= set(commits[0].files)
    assert "generated_from_trainer" in ModelCard(commits[0].files["README.md"].decode()).data.tags
