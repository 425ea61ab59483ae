"""scripts/bench_gpu.py on the CPU: the tiny mode runs every case end to end (no GPU needed, about 30 s in all)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_gpu  # noqa: E402

TINY_CPU = ["--device", "cpu", "--tiny"]


def read_outputs(out_dir: Path) -> tuple[dict, str]:
    return json.loads((out_dir / "bench_gpu.json").read_text()), (out_dir / "bench_gpu.md").read_text()


def assert_case_complete(case: dict) -> None:
    assert set(case["variants"]) == set(bench_gpu.VARIANTS)
    for name, summary in case["variants"].items():
        assert math.isfinite(summary["median_ms"]) and summary["median_ms"] > 0, name
        assert summary["steps"] == case["rounds"] >= 1
        assert summary["peak_memory_gib"] is None  # no CUDA memory statistics on the CPU
    assert case["variants"]["plain-sdpa"]["time_ratio"] == pytest.approx(1.0)
    for name in ("plain-sdpa", "tl-align-value-channel"):
        kernels = case["sdpa_kernels"][name]
        assert kernels["only"] == "not applicable on cpu"
        assert any("scaled_dot_product" in op for op in kernels["default_ops"]), kernels


def test_tiny_cpu_run_writes_every_case_and_the_table(tmp_path):
    results = bench_gpu.main([*TINY_CPU, "--no-compile", "--out-dir", str(tmp_path)])
    written, table = read_outputs(tmp_path)
    assert written == json.loads(json.dumps(results))
    assert [case["case"] for case in written["cases"]] == ["deit_s-b4-not-compiled", "vit_b-b4-not-compiled"]
    for case in written["cases"]:
        assert_case_complete(case)
        assert case["aligned_lam_max_abs_diff"] < 1e-5  # value channel and eager probabilities agree in float32
    assert written["skipped"] == []
    assert len(written["goals"]) == 4  # step time and peak memory, per case
    assert {goal["passed"] for goal in written["goals"] if goal["goal"] == "peak memory"} == {None}
    environment = written["environment"]
    assert environment["command"].startswith("python scripts/bench_gpu.py --device cpu --tiny")
    assert environment["torch"] == torch.__version__ and environment["precision"] == "float32"
    assert "## Goals" in table and "| result |" in table
    assert "| deit_s-b4-not-compiled | step time |" in table
    assert "| tl-align-value-channel |" in table and "not applicable on cpu" in table
    assert [(row["classes"], row["variant"]) for row in written["loss"]] == [
        (100, "two-cross-entropy"), (100, "mixing-loss"), (100, "soft-target")
    ]
    for row in written["loss"]:
        assert row["median_ms"] > 0 and row["difference"] < 1e-5, row
    assert "## Mixed loss alone" in table and "| 8 | 100 | mixing-loss |" in table


def test_tiny_cpu_compiled_case(tmp_path):
    # aot_eager traces with dynamo and AOT autograd as inductor does, without its C++ code generation (minutes
    # on one CPU thread); the GPU run uses inductor.
    bench_gpu.main([*TINY_CPU, "--compile-only", "--models", "deit_s", "--compile-backend", "aot_eager",
                    "--out-dir", str(tmp_path)])
    written, table = read_outputs(tmp_path)
    (case,) = written["cases"]
    assert case["case"] == "deit_s-b4-compiled" and case["compiled"]
    assert_case_complete(case)
    for name in ("plain-sdpa", "tl-align-value-channel", "tl-align-eager"):
        assert case["variants"][name]["graph_breaks"]["count"] == 0, case["variants"][name]["graph_breaks"]
    assert "torch.compile" in table


def test_time_budget_skips_cases_with_a_note(tmp_path):
    bench_gpu.main([*TINY_CPU, "--no-compile", "--max-minutes", "0", "--out-dir", str(tmp_path)])
    written, table = read_outputs(tmp_path)
    assert written["cases"] == [] and written["goals"] == []
    assert [skip["case"] for skip in written["skipped"]] == ["deit_s-b4-not-compiled", "vit_b-b4-not-compiled"]
    assert all("time budget" in skip["note"] for skip in written["skipped"])
    assert "## Skipped" in table


def test_only_kernel_check_records_a_refusal():
    device = torch.device("cpu")
    spec = bench_gpu.TINY_MODELS["vit_b"]
    (run,) = bench_gpu.make_runs(spec, ["tl-align-value-channel"], None, device)
    batch = bench_gpu.make_mixed_batch(spec, 4, device)
    autocast = bench_gpu.autocast_for(device, "fp32")
    # The CPU has a flash kernel but no memory-efficient one: one check runs, the other is refused.
    assert bench_gpu.try_only_kernel(run, batch, autocast, device, SDPBackend.FLASH_ATTENTION)["ran"]
    refused = bench_gpu.try_only_kernel(run, batch, autocast, device, SDPBackend.EFFICIENT_ATTENTION)
    assert not refused["ran"] and refused["error"]
    assert all(parameter.grad is None for parameter in run.model.parameters())


def test_parser_defaults_are_the_gpu_run():
    args = bench_gpu.make_parser().parse_args([])
    assert args.out_dir == "bench_gpu_out" and args.max_minutes <= 5
    assert args.models == ["deit_s", "vit_b"] and not args.no_compile and args.compile_backend == "inductor"
    assert bench_gpu.FULL_MODELS["vit_b"].config_values["num_labels"] == 1000
