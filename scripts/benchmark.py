"""Training-step cost of TL-Align against plain mixing and the official formulation, on the CPU or a GPU.

On a GPU machine (one H100/H200-class GPU) one command gives the whole table in under 5 minutes (``--max-minutes``):
DeiT-S/16 and ViT-B/16, batch 128 and 256, bf16, compiled and not, peak memory, SDPA kernels, the mixed loss at
1000 and 21841 classes, and the goals (value channel within 5% of plain SDPA in step time, within 2% in memory):

    python scripts/benchmark.py --out-dir benchmark_out

On the CPU the step tables of docs/benchmarks.md sections 2 and 6 (this was scripts/bench_overhead.py):

    python scripts/benchmark.py --device cpu --configs tiny small --steps 10 --warmup 2
    python scripts/benchmark.py --device cpu --configs tiny --compile --variants plain-sdpa tl-align-sdpa

The GPU run's code on the CPU in seconds (tiny stand-ins, float32; tests/test_benchmark.py runs it):
``python scripts/benchmark.py --device cpu --smoke --no-compile --out-dir /tmp/benchmark_smoke``. Every run
writes ``benchmark.json`` and ``benchmark.md`` (scripts/benchmark_report.py) to ``--out-dir`` and prints the
markdown. The defaults depend on the device (see ``--help``); ``--smoke`` takes the GPU run's, on tiny configs.

A case is a model config, a batch size, compiled or not. Every variant (``VARIANTS``) has its own copy of the same
weights (AdamW, learning rate 0) and steps (forward + backward + AdamW) on one token-grid CutMix batch in
interleaved rounds, in rotating order, so that drift of the machine hits all alike. Per variant: the median step,
the median and quartiles of its per-round ratio to the first variant, the fastest step, on CUDA the peak memory of
its own step; per case the SDPA kernels that ran (on CUDA also flash only and memory-efficient only) and
``max |aligned_lam(value channel) - aligned_lam(eager)|``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
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
from transformers import DeiTConfig, SwinConfig, Swinv2Config, TimmWrapperConfig, ViTConfig

import tl_align_hf
from tl_align_hf.value_channel import restore_projections

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import loss_rows  # noqa: E402  (the mixed loss at any class count)
from benchmark_report import CANDIDATE, evaluate_goals, write_results  # noqa: E402

SCRIPT = "scripts/benchmark.py"
LABEL_SMOOTHING = 0.1
GIB = 2**30


@dataclass(frozen=True)
class ModelSpec:
    """A model config: aligned class, config class and sizes (``config_values``), patch size, image size, labels."""

    title: str
    aligned_class: type
    config_class: type
    config_values: dict
    patch_size: int
    image_size: int = 224
    num_labels: int = 1000


_VIT_LIKE = (DeiTConfig, ViTConfig)  # the families the official formulation (global attention, CLS) applies to
CONFIGS = {
    "tiny": ModelSpec("DeiT-Tiny", tl_align_hf.TLAlignDeiTForImageClassification, DeiTConfig, dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768), 16),
    "small": ModelSpec("DeiT-Small (DeiT-S/16)", tl_align_hf.TLAlignDeiTForImageClassification, DeiTConfig, dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536), 16),
    "vit_b": ModelSpec("ViT-B/16", tl_align_hf.TLAlignViTForImageClassification, ViTConfig, dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072), 16),
    # SwinConfig's defaults are Swin-T: embed_dim 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7
    "swin_tiny": ModelSpec("Swin-Tiny", tl_align_hf.TLAlignSwinForImageClassification, SwinConfig, {}, 4),
    # Swin V2-T (microsoft/swinv2-tiny-patch4-window8-256's shape): transformers' Swinv2 has eager attention only
    "swinv2_tiny": ModelSpec("Swin V2-Tiny", tl_align_hf.TLAlignSwinv2ForImageClassification, Swinv2Config,
                             dict(window_size=8), 4),
    # timm's eva02_tiny_patch14_224 (embed 192, 12 blocks, 3 heads, SwiGLU, RoPE) through TimmWrapper, no Hub weights
    "eva02_tiny": ModelSpec("EVA-02-Tiny (timm)", tl_align_hf.TLAlignTimmWrapperForImageClassification,
                            TimmWrapperConfig, dict(architecture="eva02_tiny_patch14_224"), 14),
}
SMOKE_VALUES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)

# variant: (attention backend, TL-Align path; None: plain mixing, "official": the official formulation)
VARIANTS = {
    "plain-sdpa": ("sdpa", None),  # plain mixing (area target), the parent transformers class
    "plain-eager": ("eager", None),  # the same, eager attention (timm: fused_attn off, its explicit softmax)
    "tl-align-sdpa": ("sdpa", "auto"),  # the aligned class, the path `auto` picks (the value channel)
    "tl-align-sdpa-eager": ("sdpa", "eager"),  # forced "eager" path: the eager attention's probabilities reused
    "tl-align-sdpa-explicit": ("sdpa", "explicit"),  # forced "explicit": probabilities recomputed beside SDPA
    "tl-align-value-channel": ("sdpa", "value_channel"),  # forced: the shares as extra value channels of SDPA
    "tl-align-value-channel-copies": ("sdpa", "value_channel"),  # the same, query/key/value widened by copies
    "tl-align-eager": ("eager", "auto"),  # eager attention, its probabilities reused
    # the parent class with output_attentions; (B, N, C) label vectors propagated L <- (L + mean_h(A_h) @ L) / 2
    # through every block (DeiT and ViT only)
    "official": ("eager", "official"),
}
GPU_VARIANTS = ["plain-sdpa", "tl-align-value-channel", "tl-align-value-channel-copies", "tl-align-eager", "official"]


def model_spec(name: str, smoke: bool = False, image_size: int | None = None) -> ModelSpec:
    """The spec of config `name`; ``smoke``: a tiny stand-in (image 32, patch 8, 64 wide, 2 blocks, 10 labels)."""
    spec = CONFIGS[name]
    if smoke:
        if spec.config_class not in _VIT_LIKE:
            raise ValueError(f"--smoke has tiny stand-ins of {[n for n, s in CONFIGS.items() if s.config_class in _VIT_LIKE]}"
                             f" only, not of {name!r}; pick those with --configs.")  # fmt: skip
        spec = dataclasses.replace(spec, title=f"{spec.title}, tiny stand-in", config_values=SMOKE_VALUES,
                                   patch_size=8, image_size=32, num_labels=10)  # fmt: skip
    return dataclasses.replace(spec, image_size=image_size) if image_size else spec


# ------------------------------------------- tl_align_hf and transformers: every call into the package is in here


def build_model(spec: ModelSpec, variant: str) -> torch.nn.Module:
    """The variant's model: the aligned class on the variant's path, or (plain, official) its transformers parent."""
    backend, path = VARIANTS[variant]
    model_class = spec.aligned_class.tl_align_parent if path in (None, "official") else spec.aligned_class
    timm = spec.config_class is TimmWrapperConfig  # timm: img_size, and its modules' fused_attn picks the backend
    sizes = {"model_args": {"img_size": spec.image_size}} if timm else {"image_size": spec.image_size,
                                                                         "patch_size": spec.patch_size}  # fmt: skip
    config = spec.config_class(num_labels=spec.num_labels, **sizes, **spec.config_values)
    config._attn_implementation = backend
    model = model_class(config)
    for module in model.modules() if timm else ():
        if hasattr(module, "fused_attn"):
            module.fused_attn = backend == "sdpa"
    if path not in (None, "official"):
        model.tl_align_attention_path = path
    if variant.endswith("-copies"):
        restore_projections(model)
    return model


def plain_loss(model, batch: dict) -> torch.Tensor:
    """Area target: the share of each sample's own label is ``mix_lam``."""
    logits = model(batch["pixel_values"]).logits
    return tl_align_hf.mixing_loss(logits, batch["labels"], batch["mix_index"], batch["mix_lam"], LABEL_SMOOTHING)


def aligned_outputs(model, batch: dict):
    return model(batch["pixel_values"], mix_index=batch["mix_index"], token_weights=batch["token_weights"],
                 mix_lam=batch["mix_lam"])  # fmt: skip


def tl_align_loss(model, batch: dict) -> torch.Tensor:
    """Aligned target: the share of each sample's own label is the model's ``aligned_lam``."""
    outputs = aligned_outputs(model, batch)
    return tl_align_hf.mixing_loss(outputs.logits, batch["labels"], batch["mix_index"], outputs.aligned_lam,
                                   LABEL_SMOOTHING)  # fmt: skip


def official_cls_labels(attentions, batch: dict, num_prefix_tokens: int, num_classes: int) -> torch.Tensor:
    """`(B, C)` CLS label of the official formulation: `(B, N, C)` label vectors propagated
    ``L <- (L + mean_h(A_h) @ L) / 2`` through every block's head-averaged attention `(B, H, N, N)`.

    Runs under the caller's autocast, as the official code does under AMP.
    """
    smoothed = torch.nn.functional.one_hot(batch["labels"], num_classes).float() * (1 - LABEL_SMOOTHING)
    smoothed = smoothed + LABEL_SMOOTHING / num_classes
    own, partner = smoothed[:, None, :], smoothed[batch["mix_index"]][:, None, :]
    prefix_shares = batch["mix_lam"][:, None].expand(-1, num_prefix_tokens)
    shares = torch.cat([prefix_shares, batch["token_weights"]], dim=1)[..., None]
    token_labels = shares * own + (1 - shares) * partner
    for attention in attentions:
        token_labels = (token_labels + attention.detach().float().mean(dim=1) @ token_labels) / 2
    return token_labels[:, 0]


def official_loss(model, batch: dict) -> torch.Tensor:
    """The official formulation: full label vectors through the attention maps the model returns."""
    outputs = model(batch["pixel_values"], output_attentions=True)
    num_prefix_tokens = 2 if model.config.model_type == "deit" else 1  # CLS (+ distillation token)
    targets = official_cls_labels(outputs.attentions, batch, num_prefix_tokens, outputs.logits.shape[-1])
    return tl_align_hf.soft_target_cross_entropy(outputs.logits, targets)


def make_batch(spec: ModelSpec, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """A token-grid CutMix batch (the batch contract) for `spec`: half of the patches of each image come from its
    partner. ``pixel_values`` `(B, 3, S, S)`, ``labels`` and ``mix_index`` `(B,)`, ``token_weights`` `(B, N)`,
    ``mix_lam`` `(B,)`."""
    generator = torch.Generator().manual_seed(seed)
    grid = spec.image_size // spec.patch_size
    token_weights = torch.ones(batch_size, grid, grid)
    token_weights[:, grid // 4 : grid // 4 + grid // 2, : grid // 2 + 2] = 0.0
    token_weights = token_weights.flatten(1)
    batch = dict(
        pixel_values=torch.randn(batch_size, 3, spec.image_size, spec.image_size, generator=generator),
        labels=torch.randint(0, spec.num_labels, (batch_size,), generator=generator),
        mix_index=torch.randperm(batch_size, generator=generator),
        token_weights=token_weights,
        mix_lam=token_weights.mean(1),
    )
    return {key: value.to(device) for key, value in batch.items()}


# ------------------------------------------------------------------------------------------------- measurement


@dataclass
class VariantRun:
    """One variant of one case: its model, its (maybe compiled) loss, its optimizer and what it measured."""

    name: str
    model: torch.nn.Module
    loss: Callable
    optimizer: torch.optim.Optimizer
    compiled: bool = False
    step_seconds: list = dataclasses.field(default_factory=list)
    step_peak_bytes: list = dataclasses.field(default_factory=list)
    first_step_seconds: float | None = None
    graph_breaks: dict | None = None  # dynamo's graph breaks in the first (compiling) step; None when not compiled


@dataclass(frozen=True)
class Case:
    config: str
    batch_size: int
    compiled: bool

    @property
    def name(self) -> str:
        return f"{self.config}-b{self.batch_size}-{'compiled' if self.compiled else 'not-compiled'}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runs(spec: ModelSpec, variant_names: list[str], compile_backend: str | None,
              device: torch.device) -> list[VariantRun]:  # fmt: skip
    """One model per variant, all with the weights of the first; AdamW with learning rate 0 keeps them equal."""
    runs, reference_state = [], None
    for name in variant_names:
        torch.manual_seed(0)
        model = build_model(spec, name).to(device).train()
        if reference_state is None:
            reference_state = model.state_dict()
        else:
            model.load_state_dict(reference_state)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda")
        loss = {None: plain_loss, "official": official_loss}.get(VARIANTS[name][1], tl_align_loss)
        if compile_backend:
            loss = torch.compile(loss, backend=compile_backend, dynamic=False)
        runs.append(VariantRun(name, model, loss, optimizer, compiled=compile_backend is not None))
    return runs


def train_step(run: VariantRun, batch: dict, autocast: Callable) -> None:
    with autocast():
        loss = run.loss(run.model, batch)
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def timed_step(run: VariantRun, batch: dict, autocast: Callable, device: torch.device) -> tuple[float, int]:
    """Seconds of one step, and its peak above the memory allocated when it began (0 on the CPU)."""
    allocated_at_start = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_at_start = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    train_step(run, batch, autocast)
    synchronize(device)
    seconds = time.perf_counter() - start
    step_peak = torch.cuda.max_memory_allocated(device) - allocated_at_start if device.type == "cuda" else 0
    return seconds, step_peak


def rotated(runs: list, round_index: int) -> list:
    return runs[round_index % len(runs) :] + runs[: round_index % len(runs)]


def warm_up(runs: list[VariantRun], batch: dict, autocast: Callable, device: torch.device, warmup: int,
            deadline: float) -> bool:  # fmt: skip
    """At least one step each (compilation happens here); the first step's time and graph breaks are kept.

    Returns False, having stopped, when the deadline passes before every variant has made its first step.
    """
    for round_index in range(max(warmup, 1)):
        for run in rotated(runs, round_index):
            first_step = run.first_step_seconds is None
            if first_step and round_index == 0 and run is not runs[0] and time.monotonic() > deadline:
                return False
            torch._dynamo.utils.counters.clear()
            seconds, _ = timed_step(run, batch, autocast, device)
            if first_step:
                run.first_step_seconds = seconds
                if run.compiled:
                    graph_breaks = torch._dynamo.utils.counters["graph_break"]
                    reasons = sorted({reason.splitlines()[0] for reason in graph_breaks})
                    run.graph_breaks = {"count": sum(graph_breaks.values()), "reasons": reasons}
    return True


def timed_rounds(runs: list[VariantRun], batch: dict, autocast: Callable, device: torch.device, rounds: int,
                 deadline: float) -> int:  # fmt: skip
    """Interleaved rounds, one step of each variant per round; stops early (after one round) past the deadline."""
    for round_index in range(rounds):
        if round_index > 0 and time.monotonic() > deadline:
            return round_index
        for run in rotated(runs, round_index):
            seconds, step_peak = timed_step(run, batch, autocast, device)
            run.step_seconds.append(seconds)
            run.step_peak_bytes.append(step_peak)
    return rounds


def resident_bytes(run: VariantRun, batch: dict) -> int:
    """The variant's own weights and optimizer state, and the batch: what it holds between steps."""
    optimizer_state = [value for state in run.optimizer.state.values() for value in state.values()]
    tensors = [*run.model.parameters(), *[value for value in optimizer_state if torch.is_tensor(value)], *batch.values()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def variant_summary(run: VariantRun, baseline: VariantRun, batch: dict, device: torch.device) -> dict:
    milliseconds = [1000 * seconds for seconds in run.step_seconds]
    # paired: the ratio to the baseline's step of the same round (drift of the machine cancels), then the median
    ratios = [seconds / base for seconds, base in zip(run.step_seconds, baseline.step_seconds)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    summary = {
        "median_ms": statistics.median(milliseconds), "time_ratio": statistics.median(ratios),
        "time_ratio_quartiles": [quartiles[0], quartiles[2]],
        "fastest_ms": min(milliseconds), "fastest_ratio": min(run.step_seconds) / min(baseline.step_seconds),
        "steps": len(milliseconds), "times_ms": milliseconds, "first_step_s": run.first_step_seconds,
        "graph_breaks": run.graph_breaks, "peak_memory_gib": None, "step_peak_memory_gib": None,
    }
    if device.type == "cuda":
        step_peak = max(run.step_peak_bytes)
        summary["step_peak_memory_gib"] = step_peak / GIB
        summary["peak_memory_gib"] = (step_peak + resident_bytes(run, batch)) / GIB
    return summary


# ------------------------------------------------------------------------------------------------- SDPA kernels

# aten ops that name the SDPA kernel chosen (forward and backward), as the profiler lists them
_SDPA_OP = re.compile(r"aten::_(scaled_dot_product_\w+|flash_attention_\w+|efficient_attention_\w+|cudnn_attention\w*)")
_KERNEL_CHECKS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def forward_backward(run: VariantRun, batch: dict, autocast: Callable, device: torch.device) -> None:
    with autocast():
        loss = run.loss(run.model, batch)
    loss.backward()
    synchronize(device)
    run.model.zero_grad(set_to_none=True)


def try_only_kernel(run: VariantRun, batch: dict, autocast: Callable, device: torch.device, backend) -> dict:
    """Forward + backward with only ``backend`` enabled: ``ran``, or refused with the error, and PyTorch's reasons
    (the warnings that say why a kernel was "not used because ...")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                forward_backward(run, batch, autocast, device)
            result = {"ran": True, "error": None}
        except RuntimeError as error:
            run.model.zero_grad(set_to_none=True)
            result = {"ran": False, "error": str(error).strip().splitlines()[0][:300]}
    messages = {str(warning.message).strip() for warning in caught}
    result["reasons"] = sorted(m for m in messages if "because" in m or "kernel" in m.lower())[:6]
    return result


def kernel_report(runs: list[VariantRun], batch: dict, autocast: Callable, device: torch.device,
                  compiled: bool) -> dict:  # fmt: skip
    """Per SDPA variant: the SDPA aten ops of one forward + backward by default, from the profiler (the kernel the
    dispatcher picked) and, on CUDA without compile, each kernel alone.

    ``only`` is ``{"flash": {...}, "efficient": {...}}`` on CUDA, a sentence where the check does not apply (the
    CPU; compiled cases, whose default ops show what inductor picked).
    """
    report = {}
    for run in runs:
        if VARIANTS[run.name][0] != "sdpa":
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            forward_backward(run, batch, autocast, device)
        ops = {match.group(0) for event in profiler.key_averages() if (match := _SDPA_OP.match(event.key))}
        entry = {"default_ops": sorted(ops)}
        if device.type != "cuda":
            entry["only"] = f"not applicable on {device.type}"
        elif compiled:
            entry["only"] = "checked in the uncompiled case"
        else:
            entry["only"] = {name: try_only_kernel(run, batch, autocast, device, kernel)
                             for name, kernel in _KERNEL_CHECKS.items()}  # fmt: skip
        report[run.name] = entry
    return report


def aligned_lam_agreement(runs: list[VariantRun], batch: dict, autocast: Callable) -> float | None:
    """Max |aligned_lam(value channel) - aligned_lam(eager)| on the same weights and batch (uncompiled models)."""
    by_name = {run.name: run for run in runs}
    if CANDIDATE not in by_name or "tl-align-eager" not in by_name:
        return None
    with torch.no_grad(), autocast():
        value_channel = aligned_outputs(by_name[CANDIDATE].model, batch).aligned_lam.float()
        eager = aligned_outputs(by_name["tl-align-eager"].model, batch).aligned_lam.float()
    return float((value_channel - eager).abs().max())


# ------------------------------------------------------------------------------------------------- cases


def measure_case(case: Case, spec: ModelSpec, args, device: torch.device, deadline: float) -> dict:
    """The case's results; ``{"case", "skipped_note"}`` when the time budget ran out during the warm-up."""
    bf16 = args.precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    batch = make_batch(spec, case.batch_size, device)
    compile_backend = args.compile_backend if case.compiled else None
    variants = [name for name in args.variants if name != "official" or spec.config_class in _VIT_LIKE]
    runs = make_runs(spec, variants, compile_backend, device)
    if not warm_up(runs, batch, autocast, device, args.warmup, deadline):
        first_steps = {run.name: run.first_step_seconds for run in runs if run.first_step_seconds is not None}
        return {"case": case.name, "skipped_note": f"stopped during the warm-up (time budget); first steps (s): {first_steps}"}
    rounds_done = timed_rounds(runs, batch, autocast, device, args.rounds, deadline)
    variants = {run.name: variant_summary(run, runs[0], batch, device) for run in runs}
    for summary in variants.values():
        baseline_memory = variants[runs[0].name]["peak_memory_gib"]
        summary["memory_ratio"] = summary["peak_memory_gib"] / baseline_memory if baseline_memory else None
    result = {
        "case": case.name, "config": case.config, "title": spec.title, "batch_size": case.batch_size,
        "image_size": spec.image_size, "compiled": case.compiled, "rounds": rounds_done, "baseline": runs[0].name,
        "variants": variants,
        "sdpa_kernels": kernel_report(runs, batch, autocast, device, case.compiled),
        "aligned_lam_max_abs_diff": None if case.compiled else aligned_lam_agreement(runs, batch, autocast),
    }
    if rounds_done < args.rounds:
        result["note"] = f"stopped after {rounds_done} of {args.rounds} rounds: time budget"
    return result


def planned_cases(args) -> list[Case]:
    """Uncompiled cases first (cheap), then the compiled ones, so that the time guard drops compiled cases first;
    the smaller batch of every model before the larger ones."""
    compile_flags = [True] if args.compile_only else [False, True] if args.compile else [False]
    return [Case(config, batch_size, compiled)
            for compiled in compile_flags for batch_size in args.batch_sizes for config in args.configs]  # fmt: skip


def estimated_seconds(case: Case, finished: list[dict]) -> float:
    """The longest finished case of the same model and compile setting (else of the same compile setting)."""
    same_kind = [done for done in finished if done["compiled"] == case.compiled]
    same_model = [done["wall_s"] for done in same_kind if done["config"] == case.config]
    return max(same_model or [done["wall_s"] for done in same_kind] or [0.0])


def run_cases(args, device: torch.device, started: float) -> tuple[list[dict], list[dict]]:
    deadline = started + 60 * args.max_minutes if args.max_minutes is not None else math.inf
    finished, skipped = [], []
    for case in planned_cases(args):
        remaining = deadline - time.monotonic()
        if estimated_seconds(case, finished) > remaining:
            skipped.append({"case": case.name, "note": f"skipped: {remaining:.0f} s of the time budget left"})
            print(f"[benchmark] {case.name}: skipped (time budget)", flush=True)
            continue
        print(f"[benchmark] {case.name} ...", flush=True)
        case_started = time.monotonic()
        result = measure_case(case, model_spec(case.config, args.smoke, args.image_size), args, device, deadline)
        torch._dynamo.reset()  # compiled code of this case is neither reused nor counted against recompile limits
        gc.collect()  # the case's models, no longer referenced, are freed before the next case is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "skipped_note" in result:
            skipped.append({"case": case.name, "note": result["skipped_note"]})
            print(f"[benchmark] {case.name}: {result['skipped_note']}", flush=True)
            continue
        result["wall_s"] = time.monotonic() - case_started
        finished.append(result)
        print(f"[benchmark] {case.name}: {result['wall_s']:.1f} s", flush=True)
    return finished, skipped


# ------------------------------------------------------------------------------------------------- results


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


# ------------------------------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--out-dir", default="benchmark_out", help="where benchmark.json and benchmark.md go")
    parser.add_argument("--smoke", action="store_true", help="the CUDA defaults on tiny stand-ins (image 32, "
                        "patch 8, 64 wide, 2 blocks, 10 labels), batch 4, one round: the GPU run's code in seconds")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                        help="default: small vit_b on CUDA, tiny small on the CPU")
    parser.add_argument("--image-size", "--image_size", type=int, default=None, help="default 224 (smoke: 32)")
    parser.add_argument("--batch-sizes", "--batch_size", nargs="+", type=int, default=None,
                        help="default: 128 256 on CUDA, 32 on the CPU (smoke: 4)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help=f"default: {' '.join(GPU_VARIANTS)} on CUDA, all on the CPU; the first is the baseline")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also the torch.compile cases (default: on CUDA and with --smoke)")
    parser.add_argument("--compile-only", action="store_true", help="only the torch.compile cases")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled cases (aot_eager: no code generation, for tests)")
    parser.add_argument("--steps", "--rounds", dest="rounds", type=int, default=None,
                        help="timed rounds per case (default: 15 on CUDA, 10 on the CPU; smoke: 1, warm-up 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 3 on CUDA, 2 on the CPU)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget; cases that would not fit are skipped with a note (default: 4.5 on CUDA)")
    parser.add_argument("--loss-classes", nargs="*", type=int, default=None,
                        help="class counts of the loss rows (default: 1000 21841 on CUDA, none on the CPU; smoke: 100)")
    parser.add_argument("--loss-batch-size", type=int, default=None, help="batch of the loss rows (default 256; smoke: 8)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast on CUDA, float32 on the CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser


def resolve_defaults(args, parser: argparse.ArgumentParser) -> torch.device:
    """Fill the device-dependent defaults: the GPU run's on CUDA and with --smoke, bench_overhead's on the CPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu, or --device cpu --smoke)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    gpu_run, smoke = device.type == "cuda" or args.smoke, args.smoke
    if args.compile_only and args.compile is False:
        parser.error("--compile-only and --no-compile exclude each other")
    defaults = dict(
        configs=["small", "vit_b"] if gpu_run else ["tiny", "small"],
        batch_sizes=[4] if smoke else [128, 256] if gpu_run else [32],
        variants=GPU_VARIANTS if gpu_run else list(VARIANTS),
        compile=gpu_run, rounds=1 if smoke else 15 if gpu_run else 10, warmup=1 if smoke else 3 if gpu_run else 2,
        max_minutes=4.5 if gpu_run else None, loss_classes=[100] if smoke else [1000, 21841] if gpu_run else [],
        loss_batch_size=8 if smoke else 256,
    )  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.rounds < 1:
        parser.error("--steps (--rounds) must be at least 1")
    for name in args.configs:
        try:
            spec = model_spec(name, smoke)
        except ValueError as error:
            parser.error(str(error))
        if not spec.aligned_class._supports_sdpa and any(VARIANTS[variant][0] == "sdpa" for variant in args.variants):
            parser.error(f"--configs {name}: {spec.aligned_class.tl_align_parent.__name__} has eager attention only; "
                         "time the eager variants (--variants plain-eager tl-align-eager)")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    device = resolve_defaults(args, parser)
    started = time.monotonic()
    cases, skipped = run_cases(args, device, started)
    loss = loss_rows(args.loss_batch_size, args.loss_classes, max(args.rounds, 3), args.warmup, device)
    results = {
        "environment": environment(device, argv, args.precision),
        "settings": {**vars(args), "label_smoothing": LABEL_SMOOTHING},
        "cases": cases, "skipped": skipped, "goals": evaluate_goals(cases), "loss": loss,
        "wall_s": time.monotonic() - started,
    }
    print(write_results(results, Path(args.out_dir)))
    return results


if __name__ == "__main__":
    main()
