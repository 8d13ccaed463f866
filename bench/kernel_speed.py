"""LoRA kernel speed against the memory-bandwidth bound (needs CUDA; run on a GPU machine).

    python bench/kernel_speed.py --out bench/results/kernel_speed.json

For mixed batches of T tokens over S tenants (ranks up to R) on projections of BERT-base and MiniLM size,
times one shrink + expand (CUDA events, median of many runs), counts the bytes the kernels must move at
least (x, A and B of the slots used, the output read and written, the rank-sized intermediate), and
reports achieved GB/s against the device's peak (measured by a large device-to-device copy). The
PyTorch reference (one matmul pair per segment) is timed beside it. Prints a table, writes JSON and PNG.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hmi_kernels.lora import find_segments, sgmv_cuda, sgmv_reference, token_slots  # noqa: E402
from hmi_kernels.runtime import cuda_available  # noqa: E402

SHAPES = [("minilm q/v", 384, 384), ("minilm ffn_in", 384, 1536), ("base q/v", 768, 768),
          ("base ffn_in", 768, 3072), ("base ffn_out", 3072, 768)]


def timed(function, repeats: int = 50) -> float:
    """Median milliseconds of `function` on the current stream."""
    for _ in range(5):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    source = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    milliseconds = timed(lambda: target.copy_(source), repeats=10)
    return 2 * source.numel() * 4 / (milliseconds / 1e3)


def case(tokens: int, tenants: int, rank: int, in_dim: int, out_dim: int, slots: int = 64) -> dict:
    rng = random.Random(tokens * 31 + tenants)
    per_tenant = [tokens // tenants + (1 if i < tokens % tenants else 0) for i in range(tenants)]
    bounds = [0]
    for count in per_tenant:
        bounds.append(bounds[-1] + count)
    used = rng.sample(range(slots), tenants)
    per_token = [slot for slot, count in zip(used, per_tenant) for _ in range(count)]
    segments = find_segments(per_token, bounds)
    x = torch.randn(tokens, in_dim, device="cuda")
    out = torch.randn(tokens, out_dim, device="cuda")
    lora_a = torch.randn(slots, rank, in_dim, device="cuda")
    lora_b = torch.randn(slots, out_dim, rank, device="cuda")
    ranks = torch.full((slots,), rank, dtype=torch.int32, device="cuda")
    device_slots = token_slots(segments, tokens, x.device)
    kernel_ms = timed(lambda: sgmv_cuda(out, x, device_slots, ranks, lora_a, lora_b))
    reference_ms = timed(lambda: sgmv_reference(out, x, segments, lora_a, lora_b))
    moved = 4 * (tokens * in_dim + 2 * tokens * out_dim + tenants * rank * (in_dim + out_dim) + 2 * tokens * rank)
    return {"tokens": tokens, "tenants": tenants, "rank": rank, "in": in_dim, "out": out_dim,
            "kernel_ms": kernel_ms, "reference_ms": reference_ms, "bytes": moved,
            "kernel_gbps": moved / (kernel_ms / 1e3) / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if not cuda_available():
        print("bench/kernel_speed.py needs CUDA and CuPy (run it on a GPU machine)", file=sys.stderr)
        return 2
    peak = peak_bandwidth()
    rows = []
    for name, in_dim, out_dim in SHAPES:
        for tokens, tenants in ((256, 16), (2048, 64), (8192, 64)):
            row = case(tokens, tenants, 16, in_dim, out_dim)
            row.update(shape=name, bound_ms=row["bytes"] / peak * 1e3)
            row["times_bound"] = row["kernel_ms"] / row["bound_ms"]
            rows.append(row)
            print(f"{name:14} T={tokens:5d} tenants={tenants:3d}: kernel {row['kernel_ms']:.3f} ms "
                  f"({row['kernel_gbps']:.0f} GB/s, {row['times_bound']:.2f}x the bandwidth bound), "
                  f"reference {row['reference_ms']:.3f} ms", flush=True)
    result = {"device": torch.cuda.get_device_name(), "peak_gbps": peak / 1e9, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    labels = [f"{r['shape']}\nT={r['tokens']}" for r in result["cases"]]
    axis.bar(range(len(labels)), [r["times_bound"] for r in result["cases"]])
    axis.axhline(2.0, color="red", linestyle="--", label="2x bound (target)")
    axis.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    axis.set_ylabel("kernel time / bandwidth bound")
    axis.set_title(f"segmented LoRA shrink+expand on {result['device']} (peak {result['peak_gbps']:.0f} GB/s)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
