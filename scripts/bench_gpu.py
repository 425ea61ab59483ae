"""One prepared GPU benchmark of TL-Align: step time, peak memory and SDPA kernels, in one command.

On the GPU machine (one H100/H200-class GPU; finishes in under 5 minutes, guarded by ``--max-minutes``):

    python scripts/bench_gpu.py --out-dir bench_gpu_out

writes ``bench_gpu_out/bench_gpu.json`` and ``bench_gpu_out/bench_gpu.md`` (the markdown is also printed).
The same code on the CPU in seconds (tiny configs, float32; what tests/test_bench_gpu.py runs):

    python scripts/bench_gpu.py --device cpu --tiny --no-compile --out-dir /tmp/bench_gpu_tiny

Cases: DeiT-S/16 and ViT-B/16 (built from configs, 1000 labels, no Hub), 224 px, batch 128 and 256, bf16
autocast, forward + backward + AdamW step (learning rate 0, so all variants keep the same weights), first without
and then with ``torch.compile``. Variants, each on its own copy of the same weights:

    plain-sdpa              the parent transformers class, SDPA, area-target soft cross-entropy
    tl-align-value-channel  the aligned class, SDPA, shares as an extra value channel of the fused kernel
    tl-align-eager          the aligned class, eager attention, its probabilities reused
    official                the parent class, eager attention with output_attentions, (B, N, C) label vectors
                            propagated L <- (L + mean_h(A_h) @ L) / 2 through every block

Per case: the median step time over interleaved rounds (one step of each variant per round, in rotating order),
the peak memory of each variant's own step, and which SDPA kernels ran. On CUDA the value-channel and plain
variants also run once with only the flash kernel and once with only the memory-efficient kernel enabled, to show
that the padded head dim keeps them eligible (a refusal is recorded with its message). Goals, with pass/fail:
TL-Align value-channel within 5% of plain SDPA in step time and within 2% in peak memory, compiled and not.

Also the mixed loss alone at ImageNet-21k width (batch 256, 21841 classes; ``scripts/bench_loss.py``): ``mixing_loss``
(no ``(B, C)`` target) against two label-smoothed ``F.cross_entropy`` terms and the soft-target formulation.

Peak memory: each variant's weights, optimizer state and the batch, plus the peak of its own step above what was
allocated when the step began (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), i.e. the
peak the variant would have alone. The JSON also keeps the raw ``max_memory_allocated``, which includes the other
variants' weights, resident at the same time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

import tl_align_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import time_variants as time_loss_variants  # noqa: E402  (the loss at any class count)
from bench_overhead import make_batch, official_cls_labels  # noqa: E402  (the CPU benchmark's batch and official target)

SCRIPT = "scripts/bench_gpu.py"
LABEL_SMOOTHING = 0.1
GIB = 2**30
TIME_LIMIT = 1.05  # value-channel step time / plain-sdpa step time
MEMORY_LIMIT = 1.02  # value-channel peak memory / plain-sdpa peak memory
GOALS = (("step time", "median_ms", TIME_LIMIT), ("peak memory", "peak_memory_gib", MEMORY_LIMIT))


@dataclass(frozen=True)
class ModelSpec:
    title: str
    family: str  # key of FAMILIES
    config_values: dict


FULL_MODELS = {
    "deit_s": ModelSpec("DeiT-S/16", "deit", dict(
        image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
        intermediate_size=1536, num_labels=1000,
    )),
    "vit_b": ModelSpec("ViT-B/16", "vit", dict(
        image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, num_labels=1000,
    )),
}
_TINY_VALUES = dict(
    image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
    num_labels=10,
)
TINY_MODELS = {
    "deit_s": ModelSpec("DeiT tiny (stands in for DeiT-S/16)", "deit", _TINY_VALUES),
    "vit_b": ModelSpec("ViT tiny (stands in for ViT-B/16)", "vit", _TINY_VALUES),
}


# ------------------------------------------------------------------------------------------------------------------
# tl_align_hf and transformers: every call into the package is in this section (adapt here when its API changes)
# ------------------------------------------------------------------------------------------------------------------
# family: (config class, parent class, aligned class, tokens before the patches for the official formulation)
FAMILIES = {
    "deit": (DeiTConfig, DeiTForImageClassification, tl_align_hf.TLAlignDeiTForImageClassification, 2),
    "vit": (ViTConfig, ViTForImageClassification, tl_align_hf.TLAlignViTForImageClassification, 1),
}


def _config(spec: ModelSpec, attention_backend: str):
    config = FAMILIES[spec.family][0](**spec.config_values)
    config._attn_implementation = attention_backend
    return config


def build_plain_sdpa(spec: ModelSpec) -> torch.nn.Module:
    return FAMILIES[spec.family][1](_config(spec, "sdpa"))


def build_tl_align_value_channel(spec: ModelSpec) -> torch.nn.Module:
    model = FAMILIES[spec.family][2](_config(spec, "sdpa"))
    model.tl_align_attention_path = "value_channel"
    return model


def build_tl_align_eager(spec: ModelSpec) -> torch.nn.Module:
    model = FAMILIES[spec.family][2](_config(spec, "eager"))
    model.tl_align_attention_path = "eager"
    return model


def build_official(spec: ModelSpec) -> torch.nn.Module:
    return FAMILIES[spec.family][1](_config(spec, "eager"))


def plain_loss(model, batch: dict) -> torch.Tensor:
    """Area target: the share of each sample's own label is ``mix_lam``."""
    logits = model(batch["pixel_values"]).logits
    return tl_align_hf.mixing_loss(logits, batch["labels"], batch["mix_index"], batch["mix_lam"], LABEL_SMOOTHING)


def tl_align_loss(model, batch: dict) -> torch.Tensor:
    """Aligned target: the share of each sample's own label is the model's ``aligned_lam``."""
    outputs = model(
        batch["pixel_values"], mix_index=batch["mix_index"], token_weights=batch["token_weights"],
        mix_lam=batch["mix_lam"],
    )
    return tl_align_hf.mixing_loss(
        outputs.logits, batch["labels"], batch["mix_index"], outputs.aligned_lam, LABEL_SMOOTHING
    )


def official_loss(model, batch: dict) -> torch.Tensor:
    """The official formulation: full label vectors through the attention maps the model returns."""
    outputs = model(batch["pixel_values"], output_attentions=True)
    num_prefix_tokens = FAMILIES[model.config.model_type][3]
    targets = official_cls_labels(
        outputs.attentions, batch, num_prefix_tokens, outputs.logits.shape[-1], LABEL_SMOOTHING
    )
    return tl_align_hf.soft_target_cross_entropy(outputs.logits, targets)


def aligned_lam(model, batch: dict) -> torch.Tensor:
    """`(B,)` aligned share of an aligned model, without gradient (for the agreement check)."""
    with torch.no_grad():
        return model(
            batch["pixel_values"], mix_index=batch["mix_index"], token_weights=batch["token_weights"],
            mix_lam=batch["mix_lam"],
        ).aligned_lam.float()


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[ModelSpec], torch.nn.Module]
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    uses_sdpa: bool


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("plain-sdpa", build_plain_sdpa, plain_loss, True),
        Variant("tl-align-value-channel", build_tl_align_value_channel, tl_align_loss, True),
        Variant("tl-align-eager", build_tl_align_eager, tl_align_loss, False),
        Variant("official", build_official, official_loss, False),
    )
}
BASELINE, CANDIDATE = "plain-sdpa", "tl-align-value-channel"


def make_mixed_batch(spec: ModelSpec, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """A token-grid CutMix batch (the batch contract) for `spec`: half of each image's patches come from its partner."""
    values = spec.config_values
    return make_batch(batch_size, values["image_size"], values["patch_size"], device, seed, values["num_labels"])


# ------------------------------------------------------------------------------------------------- measurement


@dataclass
class VariantRun:
    """One variant of one case: its model, its (maybe compiled) loss, its optimizer and what it measured."""

    name: str
    model: torch.nn.Module
    loss: Callable
    optimizer: torch.optim.Optimizer
    step_seconds: list
    step_peak_bytes: list
    allocated_peak_bytes: list
    first_step_seconds: float | None = None
    graph_breaks: dict | None = None  # dynamo's graph breaks in the first (compiling) step; None when not compiled
    compiled: bool = False


@dataclass(frozen=True)
class Case:
    model_key: str
    batch_size: int
    compiled: bool

    @property
    def name(self) -> str:
        return f"{self.model_key}-b{self.batch_size}-{'compiled' if self.compiled else 'not-compiled'}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, precision: str) -> Callable:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_runs(spec: ModelSpec, variant_names: list[str], compile_backend: str | None,
              device: torch.device) -> list[VariantRun]:
    """One model per variant, all with the weights of the first; AdamW with learning rate 0 keeps them equal."""
    runs, reference_state = [], None
    for name in variant_names:
        variant = VARIANTS[name]
        torch.manual_seed(0)
        model = variant.build(spec).to(device).train()
        if reference_state is None:
            reference_state = model.state_dict()
        else:
            model.load_state_dict(reference_state)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")
        loss = torch.compile(variant.loss, backend=compile_backend, dynamic=False) if compile_backend else variant.loss
        runs.append(VariantRun(name, model, loss, optimizer, [], [], [], compiled=compile_backend is not None))
    return runs


def train_step(run: VariantRun, batch: dict, autocast: Callable) -> None:
    with autocast():
        loss = run.loss(run.model, batch)
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def timed_step(run: VariantRun, batch: dict, autocast: Callable, device: torch.device) -> tuple[float, int, int]:
    """Seconds of one step, its peak above the memory allocated when it began, and the raw peak (0 on the CPU)."""
    allocated_at_start = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_at_start = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    train_step(run, batch, autocast)
    synchronize(device)
    seconds = time.perf_counter() - start
    raw_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, raw_peak - allocated_at_start if raw_peak else 0, raw_peak


def graph_break_summary(graph_breaks: dict) -> dict:
    """Dynamo's graph-break counter: the count, and the first line of each distinct reason."""
    reasons = sorted({reason.splitlines()[0] for reason in graph_breaks})
    return {"count": sum(graph_breaks.values()), "reasons": reasons}


def rotated(runs: list, round_index: int) -> list:
    shift = round_index % len(runs)
    return runs[shift:] + runs[:shift]


def warm_up(runs: list[VariantRun], batch: dict, autocast: Callable, device: torch.device, warmup: int,
            deadline: float) -> bool:
    """At least one step each (compilation happens here); the first step's time and graph breaks are kept.

    Returns False, having stopped, when the deadline passes before every variant has made its first step.
    """
    for round_index in range(max(warmup, 1)):
        for run in rotated(runs, round_index):
            first_step = run.first_step_seconds is None
            if first_step and round_index == 0 and run is not runs[0] and time.monotonic() > deadline:
                return False
            torch._dynamo.utils.counters.clear()
            seconds, _, _ = timed_step(run, batch, autocast, device)
            if first_step:
                run.first_step_seconds = seconds
                if run.compiled:
                    run.graph_breaks = graph_break_summary(torch._dynamo.utils.counters["graph_break"])
    return True


def timed_rounds(runs: list[VariantRun], batch: dict, autocast: Callable, device: torch.device, rounds: int,
                 deadline: float) -> int:
    """Interleaved rounds, one step of each variant per round; stops early (after one round) past the deadline."""
    for round_index in range(rounds):
        if round_index > 0 and time.monotonic() > deadline:
            return round_index
        for run in rotated(runs, round_index):
            seconds, step_peak, raw_peak = timed_step(run, batch, autocast, device)
            run.step_seconds.append(seconds)
            run.step_peak_bytes.append(step_peak)
            run.allocated_peak_bytes.append(raw_peak)
    return rounds


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def resident_bytes(run: VariantRun, batch: dict) -> int:
    """The variant's own weights and optimizer state, and the batch: what it holds between steps."""
    optimizer_state = [value for state in run.optimizer.state.values() for value in state.values()]
    optimizer_tensors = [value for value in optimizer_state if isinstance(value, torch.Tensor)]
    return tensor_bytes([*run.model.parameters(), *optimizer_tensors, *batch.values()])


def variant_summary(run: VariantRun, batch: dict, device: torch.device) -> dict:
    milliseconds = sorted(1000 * seconds for seconds in run.step_seconds)
    quartiles = statistics.quantiles(milliseconds, n=4) if len(milliseconds) > 1 else [milliseconds[0]] * 3
    summary = {
        "median_ms": statistics.median(milliseconds),
        "q1_ms": quartiles[0],
        "q3_ms": quartiles[2],
        "steps": len(milliseconds),
        "first_step_s": run.first_step_seconds,
        "graph_breaks": run.graph_breaks,
        "peak_memory_gib": None,
        "step_peak_memory_gib": None,
        "max_memory_allocated_gib": None,
    }
    if device.type == "cuda":
        step_peak = max(run.step_peak_bytes)
        summary["step_peak_memory_gib"] = step_peak / GIB
        summary["peak_memory_gib"] = (step_peak + resident_bytes(run, batch)) / GIB
        summary["max_memory_allocated_gib"] = max(run.allocated_peak_bytes) / GIB
    return summary


def add_ratios(variants: dict) -> None:
    """Time and memory of every variant relative to plain-sdpa (when it ran)."""
    baseline = variants.get(BASELINE)
    for summary in variants.values():
        summary["time_ratio"] = summary["median_ms"] / baseline["median_ms"] if baseline else None
        has_memory = baseline and baseline["peak_memory_gib"] is not None
        summary["memory_ratio"] = summary["peak_memory_gib"] / baseline["peak_memory_gib"] if has_memory else None


# ------------------------------------------------------------------------------------------------- SDPA kernels

# aten ops that name the SDPA kernel chosen (forward and backward), as the profiler lists them
_SDPA_OP = re.compile(
    r"aten::_(scaled_dot_product_\w+|flash_attention_\w+|efficient_attention_\w+|cudnn_attention\w*)"
)
_KERNEL_CHECKS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def forward_backward(run: VariantRun, batch: dict, autocast: Callable, device: torch.device) -> None:
    with autocast():
        loss = run.loss(run.model, batch)
    loss.backward()
    synchronize(device)
    run.model.zero_grad(set_to_none=True)


def sdpa_ops_that_ran(run: VariantRun, batch: dict, autocast: Callable, device: torch.device) -> list[str]:
    """The SDPA aten ops of one forward + backward, from the profiler (which kernel the dispatcher picked)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        forward_backward(run, batch, autocast, device)
    return sorted({match.group(0) for event in profiler.key_averages() if (match := _SDPA_OP.match(event.key))})


def _warning_reasons(caught: list) -> list[str]:
    """PyTorch explains a refused kernel in warnings ("... not used because ..."); keep those."""
    messages = [str(warning.message).strip() for warning in caught]
    return sorted({message for message in messages if "because" in message or "kernel" in message.lower()})[:6]


def try_only_kernel(run: VariantRun, batch: dict, autocast: Callable, device: torch.device, backend) -> dict:
    """Forward + backward with only ``backend`` enabled: ``ran``, or refused with the error and the reasons."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                forward_backward(run, batch, autocast, device)
            result = {"ran": True, "error": None}
        except RuntimeError as error:
            run.model.zero_grad(set_to_none=True)
            result = {"ran": False, "error": str(error).strip().splitlines()[0][:300]}
    result["reasons"] = _warning_reasons(caught)
    return result


def kernel_report(runs: list[VariantRun], batch: dict, autocast: Callable, device: torch.device,
                  compiled: bool) -> dict:
    """Per SDPA variant: the SDPA ops that ran by default and, on CUDA without compile, each kernel alone.

    ``only`` is ``{"flash": {...}, "efficient": {...}}`` on CUDA, a sentence where the check does not apply (the
    CPU; compiled cases, whose default ops show what inductor picked).
    """
    report = {}
    for run in runs:
        if not VARIANTS[run.name].uses_sdpa:
            continue
        entry = {"default_ops": sdpa_ops_that_ran(run, batch, autocast, device)}
        if device.type != "cuda":
            entry["only"] = f"not applicable on {device.type}"
        elif compiled:
            entry["only"] = "checked in the uncompiled case"
        else:
            entry["only"] = {name: try_only_kernel(run, batch, autocast, device, backend)
                             for name, backend in _KERNEL_CHECKS.items()}
        report[run.name] = entry
    return report


def aligned_lam_agreement(runs: list[VariantRun], batch: dict, autocast: Callable) -> float | None:
    """Max |aligned_lam(value channel) - aligned_lam(eager)| on the same weights and batch (uncompiled models)."""
    by_name = {run.name: run for run in runs}
    if CANDIDATE not in by_name or "tl-align-eager" not in by_name:
        return None
    with autocast():
        value_channel = aligned_lam(by_name[CANDIDATE].model, batch)
        eager = aligned_lam(by_name["tl-align-eager"].model, batch)
    return float((value_channel - eager).abs().max())


# ------------------------------------------------------------------------------------------------- cases


def measure_case(case: Case, models: dict, args, device: torch.device, deadline: float) -> dict:
    """The case's results; ``{"case", "skipped_note"}`` when the time budget ran out during the warm-up."""
    spec = models[case.model_key]
    torch._dynamo.reset()  # compiled code of earlier cases is neither reused nor counted against recompile limits
    started = time.monotonic()
    autocast = autocast_for(device, args.precision)
    batch = make_mixed_batch(spec, case.batch_size, device)
    runs = make_runs(spec, args.variants, args.compile_backend if case.compiled else None, device)
    if not warm_up(runs, batch, autocast, device, args.warmup, deadline):
        first_steps = {run.name: run.first_step_seconds for run in runs if run.first_step_seconds is not None}
        del runs, batch
        free_memory(device)
        note = f"stopped during the warm-up (time budget); first steps (s): {first_steps}"
        return {"case": case.name, "skipped_note": note}
    rounds_done = timed_rounds(runs, batch, autocast, device, args.rounds, deadline)
    variants = {run.name: variant_summary(run, batch, device) for run in runs}
    add_ratios(variants)
    result = {
        "case": case.name, "model": case.model_key, "title": spec.title, "batch_size": case.batch_size,
        "image_size": spec.config_values["image_size"], "compiled": case.compiled, "rounds": rounds_done,
        "variants": variants,
        "sdpa_kernels": kernel_report(runs, batch, autocast, device, case.compiled),
        "aligned_lam_max_abs_diff": None if case.compiled else aligned_lam_agreement(runs, batch, autocast),
    }
    if rounds_done < args.rounds:
        result["note"] = f"stopped after {rounds_done} of {args.rounds} rounds: time budget"
    del runs, batch
    free_memory(device)
    result["wall_s"] = time.monotonic() - started
    return result


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def planned_cases(args) -> list[Case]:
    """Uncompiled cases first (cheap), then the compiled ones, so that the time guard drops compiled cases first;
    the smaller batch of every model before the larger ones."""
    compile_flags = [False, True]
    if args.no_compile:
        compile_flags = [False]
    elif args.compile_only:
        compile_flags = [True]
    return [
        Case(model_key, batch_size, compiled)
        for compiled in compile_flags for batch_size in args.batch_sizes for model_key in args.models
    ]


def estimated_seconds(case: Case, finished: list[dict]) -> float:
    """The longest finished case of the same model and compile setting (else of the same compile setting)."""
    same_kind = [done for done in finished if done["compiled"] == case.compiled]
    same_model = [done["wall_s"] for done in same_kind if done["model"] == case.model_key]
    same_kind = [done["wall_s"] for done in same_kind]
    return max(same_model or same_kind or [0.0])


def run_cases(args, models: dict, device: torch.device, started: float) -> tuple[list[dict], list[dict]]:
    deadline = started + 60 * args.max_minutes
    finished, skipped = [], []
    for case in planned_cases(args):
        remaining = deadline - time.monotonic()
        if estimated_seconds(case, finished) > remaining:
            skipped.append({"case": case.name, "note": f"skipped: {remaining:.0f} s of the time budget left"})
            print(f"[bench_gpu] {case.name}: skipped (time budget)", flush=True)
            continue
        print(f"[bench_gpu] {case.name} ...", flush=True)
        result = measure_case(case, models, args, device, deadline)
        if "skipped_note" in result:
            skipped.append({"case": case.name, "note": result["skipped_note"]})
            print(f"[bench_gpu] {case.name}: {result['skipped_note']}", flush=True)
            continue
        finished.append(result)
        print(f"[bench_gpu] {case.name}: {result['wall_s']:.1f} s", flush=True)
    return finished, skipped


# ------------------------------------------------------------------------------------------------- goals and report


def evaluate_goals(cases: list[dict]) -> list[dict]:
    """Value channel against plain SDPA per case: step time within 5%, peak memory within 2%."""
    goals = []
    for case in cases:
        variants = case["variants"]
        for goal, key, limit in GOALS:
            baseline, candidate = variants.get(BASELINE, {}).get(key), variants.get(CANDIDATE, {}).get(key)
            ratio = candidate / baseline if baseline and candidate is not None else None
            goals.append({
                "case": case["case"], "goal": goal, "limit": limit, "plain": baseline, "value_channel": candidate,
                "ratio": ratio, "passed": None if ratio is None else ratio <= limit,
            })
    return goals


def environment(device: torch.device, argv: list[str], precision: str) -> dict:
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "tl_align_hf": getattr(tl_align_hf, "__version__", "?"), "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", SCRIPT, *argv]),
        "precision": "bf16 autocast" if precision == "bf16" else "float32",
    }


def _number(value, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _verdict(passed) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[passed]


def header_lines(results: dict) -> list[str]:
    env, settings = results["environment"], results["settings"]
    return [
        "# TL-Align GPU benchmark", "",
        f"- device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"tl_align_hf {env['tl_align_hf']}, Python {env['python']}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- {env['precision']}; forward + backward + AdamW (lr 0); median of {settings['rounds']} interleaved rounds "
        f"after {settings['warmup']} warm-up rounds; label smoothing {LABEL_SMOOTHING}; compiled cases: "
        f"torch.compile(backend={settings['compile_backend']!r}, dynamic=False) of each variant's forward + loss",
        f"- wall time {results['wall_s']:.0f} s (budget {settings['max_minutes']} min)",
        "- peak memory: the variant's weights + optimizer state + batch + the peak of its own step above that",
        "",
    ]


def goal_lines(goals: list[dict]) -> list[str]:
    lines = ["## Goals: tl-align-value-channel against plain-sdpa", "",
             "| case | goal | plain-sdpa | tl-align-value-channel | ratio | limit | result |",
             "|---|---|---|---|---|---|---|"]
    for goal in goals:
        unit = " ms" if goal["goal"] == "step time" else " GiB"
        lines.append(
            f"| {goal['case']} | {goal['goal']} | {_number(goal['plain'], 2, unit)} | "
            f"{_number(goal['value_channel'], 2, unit)} | {_number(goal['ratio'], 3)} | <= {goal['limit']:.2f} | "
            f"{_verdict(goal['passed'])} |"
        )
    return lines + [""]


def case_lines(case: dict) -> list[str]:
    compiled = "torch.compile" if case["compiled"] else "not compiled"
    lines = [f"### {case['title']}, {case['image_size']} px, batch {case['batch_size']}, {compiled}, "
             f"rounds: {case['rounds']}", "",
             "| variant | median step (ms) | quartiles (ms) | vs plain-sdpa | peak memory (GiB) | vs plain-sdpa | "
             "step peak (GiB) | first step (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, summary in case["variants"].items():
        lines.append(
            f"| {name} | {summary['median_ms']:.2f} | {summary['q1_ms']:.2f}-{summary['q3_ms']:.2f} | "
            f"{_number(summary['time_ratio'], 3)} | {_number(summary['peak_memory_gib'])} | "
            f"{_number(summary['memory_ratio'], 3)} | {_number(summary['step_peak_memory_gib'])} | "
            f"{_number(summary['first_step_s'])} |"
        )
    if case["aligned_lam_max_abs_diff"] is not None:
        difference = case["aligned_lam_max_abs_diff"]
        lines.append(f"\nmax |aligned_lam(value channel) - aligned_lam(eager)|: {difference:.2e}")
    for name, summary in case["variants"].items():
        breaks = summary["graph_breaks"]
        if breaks and breaks["count"]:
            lines.append(f"\n{name}: {breaks['count']} graph breaks ({'; '.join(breaks['reasons'])})")
    if case.get("note"):
        lines.append(f"\nNote: {case['note']}")
    return lines + [""]


def kernel_lines(cases: list[dict]) -> list[str]:
    lines = ["## SDPA kernels", "", "| case | variant | check | result |", "|---|---|---|---|"]
    for case in cases:
        for variant, entry in case["sdpa_kernels"].items():
            default_ops = ", ".join(entry["default_ops"]) or "none found"
            lines.append(f"| {case['case']} | {variant} | default | {default_ops} |")
            if isinstance(entry["only"], str):
                lines.append(f"| {case['case']} | {variant} | only flash / only efficient | {entry['only']} |")
                continue
            for kernel, outcome in entry["only"].items():
                result = "ran" if outcome["ran"] else f"refused: {outcome['error']}"
                if outcome["reasons"]:
                    result += " (" + "; ".join(outcome["reasons"]) + ")"
                lines.append(f"| {case['case']} | {variant} | only {kernel} | {result.replace('|', '/')} |")
    return lines + [""]


def loss_lines(loss_rows: list[dict]) -> list[str]:
    lines = ["## Mixed loss alone (forward + backward, float32 logits)", "",
             "| batch | classes | variant | median (ms) | vs two-cross-entropy | abs. difference from soft-target |",
             "|---|---|---|---|---|---|"]
    for row in loss_rows:
        lines.append(
            f"| {row['batch_size']} | {row['classes']} | {row['variant']} | {row['median_ms']:.3f} | "
            f"{row['ratio']:.3f} | {row['difference']:.1e} |"
        )
    return lines + [""]


def measure_loss(args, device: torch.device) -> list[dict]:
    """The loss variants of scripts/bench_loss.py on this device, one row per (classes, variant)."""
    rows = []
    for num_classes in args.loss_classes:
        results = time_loss_variants(args.loss_batch_size, num_classes, max(args.rounds, 3), args.warmup, device)
        baseline = results["two-cross-entropy"][0]
        for variant, (milliseconds, difference) in results.items():
            rows.append({"batch_size": args.loss_batch_size, "classes": num_classes, "variant": variant,
                         "median_ms": milliseconds, "ratio": milliseconds / baseline, "difference": difference})
    return rows


def markdown(results: dict) -> str:
    lines = header_lines(results) + goal_lines(results["goals"]) + ["## Step time and memory", ""]
    for case in results["cases"]:
        lines += case_lines(case)
    lines += kernel_lines(results["cases"])
    lines += loss_lines(results["loss"])
    if results["skipped"]:
        lines += ["## Skipped", ""] + [f"- {skip['case']}: {skip['note']}" for skip in results["skipped"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="bench_gpu_out", help="where bench_gpu.json and bench_gpu.md go")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny configs (image 32, patch 8, hidden 64, 2 layers, 2 heads, 10 labels), batch 4")
    parser.add_argument("--models", nargs="+", choices=list(FULL_MODELS), default=list(FULL_MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 128 256 (tiny: 4)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    compile_group.add_argument("--compile-only", action="store_true", help="only the torch.compile cases")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled cases (aot_eager: no code generation, for tests)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 15; tiny: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds per case (default 3; tiny: 1)")
    parser.add_argument("--max-minutes", type=float, default=4.5,
                        help="time budget: cases that would not fit are skipped with a note")
    parser.add_argument("--loss-classes", nargs="*", type=int, default=None,
                        help="class counts of the loss rows (default 1000 21841; tiny: 100; none: skip)")
    parser.add_argument("--loss-batch-size", type=int, default=None, help="batch of the loss rows (default 256; tiny: 8)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast on CUDA, float32 on the CPU")
    return parser


def resolve_defaults(args, parser: argparse.ArgumentParser) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu --tiny for a CPU run)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.batch_sizes = args.batch_sizes or ([4] if args.tiny else [128, 256])
    if args.loss_classes is None:
        args.loss_classes = [100] if args.tiny else [1000, 21841]
    args.loss_batch_size = args.loss_batch_size or (8 if args.tiny else 256)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.tiny else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return device


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    device = resolve_defaults(args, parser)
    started = time.monotonic()
    models = TINY_MODELS if args.tiny else FULL_MODELS
    cases, skipped = run_cases(args, models, device, started)
    results = {
        "environment": environment(device, argv, args.precision),
        "settings": {key: value for key, value in vars(args).items()},
        "cases": cases, "skipped": skipped, "goals": evaluate_goals(cases), "loss": measure_loss(args, device),
        "wall_s": time.monotonic() - started,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out_dir / "bench_gpu.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
