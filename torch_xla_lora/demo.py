"""The op demo: every op on the XLA device, both backends, against the plain-torch reference."""

from __future__ import annotations

import time

import torch


def run(seed: int = 0) -> int:
    """Print each op's largest difference from the reference; return 0 when all are within tolerance."""
    import torch_xla

    import torch_xla_lora as tl
    from torch_xla_lora import reference

    device = torch_xla.device()
    g = torch.Generator().manual_seed(seed)
    num_tokens, hidden, rank, num_slots, out_dim = 256, 2048, 16, 8, 2048
    x = torch.randn(num_tokens, hidden, generator=g)
    a = torch.randn(num_slots, rank, hidden, generator=g) / hidden**0.5
    b = torch.randn(num_slots, rank, out_dim, generator=g) / rank**0.5
    base = torch.randn(num_tokens, out_dim, generator=g)
    idx = torch.randint(-1, num_slots, (num_tokens,), generator=g, dtype=torch.int32)
    print(f"device {device} ({tl.ops.device_generation()}); T={num_tokens} D={hidden} R={rank} L={num_slots}")
    print("adapter per token (first 16):", idx[:16].tolist(), "(-1 = base model)")
    ok = True
    for backend in ("xla", "pallas"):
        start = time.perf_counter()
        dev = [t.to(device) for t in (x, a, b, base, idx)]
        s = tl.bgmv_shrink(dev[0], dev[1], dev[4], 1.0, backend)
        y = tl.bgmv_expand(s, dev[2], dev[3], dev[4], True, backend)
        z = tl.bgmv_expand_slice(s, dev[2][:, :, :512], dev[3], dev[4], 1024, True, backend)
        results = {"bgmv_shrink": s.cpu(), "bgmv_expand": y.cpu(), "bgmv_expand_slice": z.cpu()}
        s_ref = reference.bgmv_shrink(x, a, idx)
        expected = {
            "bgmv_shrink": s_ref,
            "bgmv_expand": reference.bgmv_expand(s_ref, b, base, idx),
            "bgmv_expand_slice": reference.bgmv_expand_slice(s_ref, b[:, :, :512], base, idx, 1024),
        }
        print(f"backend {backend} (first call, incl. compilation: {time.perf_counter() - start:.1f} s)")
        for name, out in results.items():
            diff = (out - expected[name]).abs().max().item()
            ok &= diff < 1e-3
            print(f"  {name:18s} max |diff| vs reference = {diff:.2e}")
    print("all ops match the reference" if ok else "MISMATCH")
    return 0 if ok else 1
