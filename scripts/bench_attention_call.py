"""One attention call, forward + backward: ways of getting a block's `mean_h(P_h) @ s` beside SDPA, on this device.

The candidates of issue 28 for the shares of the fused path, at DeiT-Tiny's shape (B=32, 3 heads, 197 tokens, head
dim 64) unless told otherwise; variants interleaved, median of the timed rounds:

    plain       F.scaled_dot_product_attention alone (the floor)
    pad72       query, key and value zero-padded to a multiple of 8 (72) with the share channel in the values
    pad65       the same padded to 65 (the value channel on the CPU since issue 28)
    explicit    SDPA, and beside it, without gradient, softmax(QK^T) in float32 and its head mean times s
    lse         the CPU flash kernel's log-sum-exp reused: exp(QK^T * scale - lse) @ s, without gradient
    kernel-D    SDPA alone on inputs that already have head dim D (65, 68, 72): the kernel's own cost of the width

and one whole attention block (`--block`: transformers' ViTAttention at that shape, SDPA, with its q/k/v/o
projections, forward + backward through the parameters), as tl_align_hf runs it:

    block-plain      the block without mixing arguments (the parent's computation)
    block-copies     the aligned block, value channel by copies of query, key and value (`restore_projections`)
    block-widened    the aligned block, value channel through widened projections (the default where they qualify)

    python scripts/bench_attention_call.py                       # DeiT-Tiny's shape, CPU
    python scripts/bench_attention_call.py --shape 32 6 197 64   # DeiT-Small's
    python scripts/bench_attention_call.py --block                # the whole block's variants only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTAttention

from tl_align_hf import TokenLabelAligner
from tl_align_hf.attention import route_attention
from tl_align_hf.value_channel import restore_projections


def make_variants(batch: int, heads: int, tokens: int, head_dim: int) -> dict:
    generator = torch.Generator().manual_seed(0)

    def leaf(width: int) -> torch.Tensor:
        return torch.randn(batch, heads, tokens, width, generator=generator).requires_grad_()

    query, key, value = leaf(head_dim), leaf(head_dim), leaf(head_dim)
    shares = torch.rand(batch, tokens, generator=generator)
    scale = head_dim**-0.5

    def plain():
        return F.scaled_dot_product_attention(query, key, value), (query, key, value)

    def padded(width: int):
        def run():
            share_channel = (shares - 0.5)[:, None, :, None].expand(batch, heads, tokens, 1)
            wide_value = torch.cat([value, share_channel, value.new_zeros(batch, heads, tokens, width - head_dim - 1)], -1)
            pad = (0, width - head_dim)
            output = F.scaled_dot_product_attention(F.pad(query, pad), F.pad(key, pad), wide_value, scale=scale)
            return output[..., :head_dim], (query, key, value)

        return run

    def explicit():
        output = F.scaled_dot_product_attention(query, key, value)
        with torch.no_grad():
            scores = torch.matmul(query * scale, key.transpose(-1, -2))
            scores -= scores.amax(-1, keepdim=True)
            scores.exp_()
            scores.div_(scores.sum(-1, keepdim=True))
            torch.bmm(scores.mean(1), shares[..., None])
        return output, (query, key, value)

    def log_sum_exp():
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, scale=scale)[:2]
        with torch.no_grad():
            flat = batch * heads
            scores = torch.baddbmm(-lse.reshape(flat, tokens, 1), (query * scale).reshape(flat, tokens, head_dim),
                                   key.reshape(flat, tokens, head_dim).transpose(1, 2))  # fmt: skip
            scores.exp_()
            torch.bmm(scores, shares.repeat_interleave(heads, 0)[..., None]).reshape(batch, heads, tokens).mean(1)
        return output, (query, key, value)

    def kernel(width: int):
        inputs = (leaf(width), leaf(width), leaf(width))

        def run():
            return F.scaled_dot_product_attention(*inputs), inputs

        return run

    variants = {"plain": plain, "pad72": padded(72), "pad65": padded(65), "explicit": explicit}
    if query.device.type == "cpu":
        variants["lse"] = log_sum_exp
    for width in (65, 68, 72):
        variants[f"kernel-{width}"] = kernel(width)
    return variants


def make_block_variants(batch: int, heads: int, tokens: int, head_dim: int) -> dict:
    """One ViTAttention block (SDPA) at the shape, routed as in an aligned model: plain, copies, widened."""
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=heads * head_dim, num_attention_heads=heads, attn_implementation="sdpa")
    widened = ViTAttention(config).train()
    route_attention(widened)
    copies = copy.deepcopy(widened)
    restore_projections(copies)
    hidden_states = torch.randn(batch, tokens, heads * head_dim).requires_grad_()
    token_weights, mix_lam = torch.rand(batch, tokens - 1), torch.rand(batch)

    def run(module, aligned: bool):
        def call():
            kwargs = {}
            if aligned:  # a fresh aligner per call, as per forward pass (CLS + patch tokens)
                kwargs["token_label_aligner"] = TokenLabelAligner(token_weights, mix_lam, 1, "value_channel")
            return module(hidden_states, **kwargs)[0], (hidden_states, *module.parameters())

        return call

    return {"block-plain": run(widened, False), "block-copies": run(copies, True), "block-widened": run(widened, True)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 3, 197, 64], metavar=("B", "H", "N", "D"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", action="store_true", help="time the whole attention block's variants only")
    args = parser.parse_args(argv)
    variants = make_block_variants(*args.shape) if args.block else make_variants(*args.shape)
    times = {name: [] for name in variants}
    for round_index in range(args.warmup + args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            output, leaves = run()
            output.backward(torch.ones_like(output))
            for tensor in leaves:
                tensor.grad = None
            if round_index >= args.warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
    baseline = statistics.median(times["block-plain" if args.block else "plain"])
    print(f"shape (B, H, N, D) = {tuple(args.shape)}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| variant | ms (median, forward + backward) | ratio to {'block-plain' if args.block else 'plain'} |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / baseline:.3f} |")


if __name__ == "__main__":
    main()
