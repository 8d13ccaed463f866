"""CUDA kernels: every source compiles to PTX with NVRTC (no GPU needed, so CI catches a broken kernel);
the PyTorch references (the CPU path) match plain loops; on a CUDA machine each kernel matches its
reference on random shapes (skipped without CUDA)."""
from __future__ import annotations

import random

import pytest
import torch

from hmi_kernels.lora import Segments, find_segments, sgmv_reference, token_slots
from hmi_kernels.plot_gather import gather_reference
from hmi_kernels.runtime import KERNELS, compile_ptx, cuda_available
from hmi_kernels.tenant_head import head_reference

gpu = pytest.mark.skipif(not cuda_available(), reason="needs CUDA (CuPy + a GPU)")


@pytest.mark.parametrize("module", sorted(KERNELS))
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_every_kernel_source_compiles_to_ptx(module, arch):
    ptx = compile_ptx(module, arch)
    for function in KERNELS[module]:
        assert f".entry {function}(" in ptx, f"{function} missing from the PTX of {module}.cu"


def test_a_broken_kernel_fails_with_the_compiler_log(tmp_path, monkeypatch):
    import hmi_kernels.runtime as runtime
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }')
    monkeypatch.setattr(runtime, "SOURCES", tmp_path)
    with pytest.raises(RuntimeError, match="undefined_name"):
        runtime.compile_ptx("broken")


def random_mixed_batch(rng: random.Random, slots: int, max_rank: int, in_dim: int, out_dim: int, device="cpu"):
    """Sequences of random tenants (some without an adapter), ranks differing per slot, zeros beyond a rank."""
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
    seq_slots = [rng.choice([-1] + list(range(slots))) for _ in lengths]
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    per_token = [slot for slot, length in zip(seq_slots, lengths) for _ in range(length)]
    ranks = torch.tensor([rng.randint(1, max_rank) for _ in range(slots)], dtype=torch.int32)
    lora_a = torch.randn(slots, max_rank, in_dim)
    lora_b = torch.randn(slots, out_dim, max_rank)
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, rank:] = 0
        lora_b[slot, :, rank:] = 0
    x = torch.randn(bounds[-1], in_dim)
    return x.to(device), find_segments(per_token, bounds), ranks.to(device), lora_a.to(device), lora_b.to(device)


def test_sgmv_reference_equals_a_per_token_loop():
    rng = random.Random(0)
    x, segments, _ranks, lora_a, lora_b = random_mixed_batch(rng, slots=5, max_rank=8, in_dim=24, out_dim=16)
    base = torch.randn(x.shape[0], 16)
    out = sgmv_reference(base.clone(), x, segments, lora_a, lora_b)
    slots = token_slots(segments, x.shape[0], torch.device("cpu")).tolist()
    for token, slot in enumerate(slots):
        expected = base[token] if slot < 0 else base[token] + lora_b[slot] @ (lora_a[slot] @ x[token])
        torch.testing.assert_close(out[token], expected, rtol=1e-5, atol=1e-5)


def test_token_slots_mark_tokens_outside_segments():
    segments = Segments(starts=(0, 5), ends=(3, 7), slots=(2, 0))
    assert token_slots(segments, 8, torch.device("cpu")).tolist() == [2, 2, 2, -1, -1, 0, 0, -1]


def test_gather_and_head_references():
    rows = torch.randn(5, 6).half()
    dest = torch.tensor([4, 0, 2, 7, 5])
    hidden = torch.full((8, 6), -1.0)
    gather_reference(hidden, rows, dest)
    for i, d in enumerate(dest.tolist()):
        assert torch.equal(hidden[d], rows[i].float())
    assert torch.equal(hidden[1], torch.full((6,), -1.0))

    pooled, weight, bias = torch.randn(3, 6), torch.randn(4, 5, 6), torch.randn(4, 5)
    logits = head_reference(pooled, weight, bias, torch.tensor([2, -1, 0]), torch.tensor([3, 2, 5]))
    torch.testing.assert_close(logits[0, :3], weight[2, :3] @ pooled[0] + bias[2, :3])
    assert torch.equal(logits[0, 3:], torch.zeros(2)) and torch.equal(logits[1], torch.zeros(5))
    torch.testing.assert_close(logits[2], weight[0] @ pooled[2] + bias[0])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(6))
def test_sgmv_kernel_matches_the_reference(seed):
    from hmi_kernels.lora import sgmv_cuda
    rng = random.Random(seed)
    in_dim, out_dim = rng.choice([(64, 64), (384, 1536), (1536, 384), (768, 768), (100, 37)])
    max_rank = rng.choice([1, 4, 8, 16, 64])
    x, segments, ranks, lora_a, lora_b = random_mixed_batch(rng, rng.randint(1, 9), max_rank, in_dim, out_dim,
                                                            device="cuda")
    base = torch.randn(x.shape[0], out_dim, device="cuda")
    expected = sgmv_reference(base.clone(), x, segments, lora_a, lora_b)
    # Garbage beyond each slot's rank must be ignored by the kernel (the reference sees zeros there).
    noisy_a, noisy_b = lora_a.clone(), lora_b.clone()
    for slot, rank in enumerate(ranks.tolist()):
        noisy_a[slot, rank:] = 1e3
        noisy_b[slot, :, rank:] = 1e3
    got = sgmv_cuda(base.clone(), x, token_slots(segments, x.shape[0], x.device), ranks, noisy_a, noisy_b)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(4))
def test_gather_and_head_kernels_match_their_references(seed):
    from hmi_kernels.plot_gather import gather_cuda
    from hmi_kernels.tenant_head import head_cuda
    generator = torch.Generator().manual_seed(seed)
    tokens, hidden_dim = int(torch.randint(1, 600, (1,), generator=generator)), [64, 384, 768][seed % 3]
    rows = torch.randn(tokens, hidden_dim, generator=generator).half().cuda()
    dest = torch.randperm(tokens + 7, generator=generator)[:tokens].cuda()
    expected = gather_reference(torch.zeros(tokens + 7, hidden_dim, device="cuda"), rows, dest)
    assert torch.equal(gather_cuda(torch.zeros(tokens + 7, hidden_dim, device="cuda"), rows, dest), expected)

    sequences, slots, max_labels = 1 + seed * 9, 5, [2, 7, 33, 1000][seed]
    pooled = torch.randn(sequences, hidden_dim, generator=generator).cuda()
    weight = torch.randn(slots, max_labels, hidden_dim, generator=generator).cuda()
    bias = torch.randn(slots, max_labels, generator=generator).cuda()
    seq_slot = torch.randint(-1, slots, (sequences,), generator=generator, dtype=torch.int32).cuda()
    seq_labels = torch.randint(1, max_labels + 1, (sequences,), generator=generator, dtype=torch.int32).cuda()
    torch.testing.assert_close(head_cuda(pooled, weight, bias, seq_slot, seq_labels),
                               head_reference(pooled, weight, bias, seq_slot, seq_labels), rtol=1e-4, atol=1e-3)
