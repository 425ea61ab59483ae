"""scripts/benchmark.py on the CPU: the GPU run's code end to end on tiny stand-ins (``--smoke``, no GPU needed,
about 30 s in all), and the CPU mode's table (what scripts/bench_overhead.py printed)."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import benchmark  # noqa: E402

SMOKE_CPU = ["--device", "cpu", "--smoke"]


def read_outputs(out_dir: Path) -> tuple[dict, str]:
    return json.loads((out_dir / "benchmark.json").read_text()), (out_dir / "benchmark.md").read_text()


def assert_case_complete(case: dict, variants: list[str]) -> None:
    assert list(case["variants"]) == variants and case["baseline"] == variants[0]
    for name, summary in case["variants"].items():
        assert math.isfinite(summary["median_ms"]) and summary["median_ms"] > 0, name
        assert summary["steps"] == case["rounds"] == len(summary["times_ms"]) >= 1
        low, high = summary["time_ratio_quartiles"]
        assert low <= summary["time_ratio"] <= high and summary["fastest_ms"] <= summary["median_ms"]
        assert summary["peak_memory_gib"] is None and summary["memory_ratio"] is None  # no CUDA memory statistics
    baseline = case["variants"][variants[0]]
    assert baseline["time_ratio"] == baseline["fastest_ratio"] == 1.0
    for name in (name for name in variants if benchmark.VARIANTS[name][0] == "sdpa"):
        kernels = case["sdpa_kernels"][name]
        assert kernels["only"] == "not applicable on cpu"
        assert any("scaled_dot_product" in op for op in kernels["default_ops"]), kernels


def test_smoke_run_writes_every_case_and_the_table(tmp_path):
    results = benchmark.main([*SMOKE_CPU, "--no-compile", "--out-dir", str(tmp_path)])
    written, table = read_outputs(tmp_path)
    assert written == json.loads(json.dumps(results))
    assert [case["case"] for case in written["cases"]] == ["small-b4-not-compiled", "vit_b-b4-not-compiled"]
    for case in written["cases"]:
        assert_case_complete(case, benchmark.GPU_VARIANTS)
        assert case["aligned_lam_max_abs_diff"] < 1e-5  # value channel and eager probabilities agree in float32
    assert written["skipped"] == []
    assert len(written["goals"]) == 4  # step time and peak memory, per case
    assert {goal["passed"] for goal in written["goals"] if goal["goal"] == "peak memory"} == {None}
    environment = written["environment"]
    assert environment["command"].startswith("python scripts/benchmark.py --device cpu --smoke")
    assert environment["torch"] == torch.__version__ and environment["precision"] == "float32"
    assert "## Goals" in table and "| result |" in table
    assert "| small-b4-not-compiled | step time |" in table
    assert "| tl-align-value-channel |" in table and "not applicable on cpu" in table
    assert [(row["classes"], row["variant"]) for row in written["loss"]] == [
        (100, "two-cross-entropy"), (100, "mixing-loss"), (100, "soft-target")
    ]
    for row in written["loss"]:
        assert row["median_ms"] > 0 and row["difference"] < 1e-5, row
    assert "## Mixed loss alone" in table and "| 8 | 100 | mixing-loss |" in table
    # the report script renders the written JSON to the same table
    rendered = subprocess.run([sys.executable, str(SCRIPTS / "benchmark_report.py"), str(tmp_path / "benchmark.json")],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert rendered == table


def test_smoke_compiled_case(tmp_path):
    # aot_eager traces with dynamo and AOT autograd as inductor does, without its C++ code generation (minutes
    # on one CPU thread); the GPU run uses inductor.
    benchmark.main([*SMOKE_CPU, "--compile-only", "--configs", "small", "--compile-backend", "aot_eager",
                    "--out-dir", str(tmp_path)])  # fmt: skip
    written, table = read_outputs(tmp_path)
    (case,) = written["cases"]
    assert case["case"] == "small-b4-compiled" and case["compiled"]
    assert_case_complete(case, benchmark.GPU_VARIANTS)
    for name in ("plain-sdpa", "tl-align-value-channel", "tl-align-eager"):
        assert case["variants"][name]["graph_breaks"]["count"] == 0, case["variants"][name]["graph_breaks"]
    assert "torch.compile" in table


def test_time_budget_skips_cases_with_a_note(tmp_path):
    benchmark.main([*SMOKE_CPU, "--no-compile", "--max-minutes", "0", "--out-dir", str(tmp_path)])
    written, table = read_outputs(tmp_path)
    assert written["cases"] == [] and written["goals"] == []
    assert [skip["case"] for skip in written["skipped"]] == ["small-b4-not-compiled", "vit_b-b4-not-compiled"]
    assert all("time budget" in skip["note"] for skip in written["skipped"])
    assert "## Skipped" in table


def test_only_kernel_check_records_a_refusal():
    device = torch.device("cpu")
    spec = benchmark.model_spec("vit_b", smoke=True)
    (run,) = benchmark.make_runs(spec, ["tl-align-value-channel"], None, device)
    batch = benchmark.make_batch(spec, 4, device)
    autocast = contextlib.nullcontext  # float32, as the CPU run
    # The CPU has a flash kernel but no memory-efficient one: one check runs, the other is refused.
    assert benchmark.try_only_kernel(run, batch, autocast, device, SDPBackend.FLASH_ATTENTION)["ran"]
    refused = benchmark.try_only_kernel(run, batch, autocast, device, SDPBackend.EFFICIENT_ATTENTION)
    assert not refused["ran"] and refused["error"]
    assert all(parameter.grad is None for parameter in run.model.parameters())


def test_cpu_mode_times_the_chosen_variants_of_a_full_size_config(tmp_path):
    # What scripts/bench_overhead.py did: --configs, --steps, --warmup, --variants on the CPU, no GPU extras.
    variants = ["plain-sdpa", "tl-align-sdpa", "plain-eager", "official"]
    benchmark.main(["--device", "cpu", "--configs", "tiny", "--image-size", "32", "--batch_size", "2", "--steps", "2",
                    "--warmup", "0", "--variants", *variants, "--out-dir", str(tmp_path)])  # fmt: skip
    written, table = read_outputs(tmp_path)
    (case,) = written["cases"]
    assert case["case"] == "tiny-b2-not-compiled" and case["title"] == "DeiT-Tiny" and case["rounds"] == 2
    assert_case_complete(case, variants)
    settings = written["settings"]
    assert settings["max_minutes"] is None and settings["precision"] == "fp32" and not settings["compile"]
    assert written["loss"] == [] and written["goals"] == []  # no value-channel variant, no loss rows on the CPU
    assert "### DeiT-Tiny, 32 px, batch 2, cpu, not compiled, rounds: 2" in table
    assert "| variant | median step (ms) | vs plain-sdpa | quartiles |" in table and "peak memory (GiB)" not in table
    assert "## Mixed loss alone" not in table


def test_timm_variants_switch_timm_attention_backend():
    spec = benchmark.model_spec("eva02_tiny", image_size=28)
    plain_eager, aligned_sdpa = benchmark.make_runs(spec, ["plain-eager", "tl-align-sdpa"], None, torch.device("cpu"))
    fused = {run.name: {m.fused_attn for m in run.model.modules() if hasattr(m, "fused_attn")}
             for run in (plain_eager, aligned_sdpa)}  # fmt: skip
    assert fused == {"plain-eager": {False}, "tl-align-sdpa": {True}}
    assert type(plain_eager.model) is benchmark.CONFIGS["eva02_tiny"].aligned_class.tl_align_parent
    for name, tensor in plain_eager.model.state_dict().items():
        torch.testing.assert_close(aligned_sdpa.model.state_dict()[name], tensor)


def test_goals_compare_the_value_channel_with_plain_sdpa_as_baseline():
    import benchmark_report

    def case(baseline: str, time_ratio: float) -> dict:
        summary = {"median_ms": 10.0, "peak_memory_gib": None, "time_ratio": 1.0, "memory_ratio": None}
        variants = {baseline: summary, "plain-sdpa": summary,
                    "tl-align-value-channel": {**summary, "median_ms": 10.6, "time_ratio": time_ratio}}  # fmt: skip
        return {"case": f"{baseline}-{time_ratio}", "baseline": baseline, "variants": variants}

    goals = benchmark_report.evaluate_goals([case("plain-sdpa", 1.06), case("plain-sdpa", 1.04), case("official", 1.0)])
    assert [(goal["case"], goal["goal"], goal["passed"]) for goal in goals] == [
        ("plain-sdpa-1.06", "step time", False), ("plain-sdpa-1.06", "peak memory", None),
        ("plain-sdpa-1.04", "step time", True), ("plain-sdpa-1.04", "peak memory", None),
    ]  # the official-baseline case has no goal: its ratios are not to plain SDPA


def test_parser_defaults_are_the_gpu_run():
    parser = benchmark.make_parser()
    args = parser.parse_args(["--device", "cpu", "--smoke"])
    benchmark.resolve_defaults(args, parser)
    assert args.configs == ["small", "vit_b"] and args.variants == benchmark.GPU_VARIANTS and args.compile
    assert args.max_minutes <= 5 and args.compile_backend == "inductor" and args.out_dir == "benchmark_out"
    args = parser.parse_args(["--device", "cpu"])
    benchmark.resolve_defaults(args, parser)
    assert args.configs == ["tiny", "small"] and args.variants == list(benchmark.VARIANTS) and not args.compile
    assert args.batch_sizes == [32] and args.loss_classes == [] and args.max_minutes is None
    assert benchmark.model_spec("vit_b").num_labels == 1000 and benchmark.model_spec("vit_b").image_size == 224


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "swin_tiny", "--smoke"], "--smoke has tiny stand-ins"),
        (["--configs", "swinv2_tiny"], "eager attention only"),
        (["--compile-only", "--no-compile"], "exclude each other"),
        (["--steps", "0"], "at least 1"),
    ],
)
def test_raises_error_when_arguments_conflict(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err
