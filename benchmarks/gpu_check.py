"""GPU check of the Triton LoRA kernels (run on a CUDA machine; < 2 minutes on an H200).

    python benchmarks/gpu_check.py

1. correctness: adapt_compiler::fused_lora_linear (forward and backward) and
   adapt_compiler::multi_lora against their pure-torch references, odd shapes, fp32/fp16/bf16;
2. timing on a 4096×4096 Linear, bf16, r=16: base GEMM, unfused LoRA (three GEMMs + add, what
   PEFT runs), the fused kernel, and an 8-adapter mixed batch through the SGMV kernel.
Prints two small tables; exits non-zero if a correctness check fails.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks against an exact-ish reference
    from adapt_compiler.lowering.kernels import add_multi_lora, fused_lora_linear
    from adapt_compiler.lowering.kernels.fused_lora import _fused_lora_ref
    from adapt_compiler.lowering.kernels.multi_lora import _multi_lora_ref

    dev = "cuda"
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
    failures = 0
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'check':<44} {'dtype':<9} {'max rel err':>12}  ok")

    def report(what, dt, got, want):
        nonlocal failures
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1)).item()
        ok = err <= tol[dt]
        failures += not ok
        print(f"{what:<44} {str(dt).removeprefix('torch.'):<9} {err:>12.2e}  {'ok' if ok else 'FAIL'}")

    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dt=torch.float32, t=False):
        x = torch.randn(*(shape[::-1] if t else shape), device=dev, generator=g).to(dt)
        return x.t() if t else x

    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for rows, rank, k, n in [(1, 1, 37, 23), (9, 8, 300, 77), (41, 16, 1000, 515), (341, 64, 513, 1030),
                                 (4096, 16, 4096, 4096)]:
            t = rows % 2 == 1 and rows < 4096
            x, w, b = rnd(rows, k, dt=dt, t=t), rnd(n, k, dt=dt, t=t) / k**0.5, rnd(n, dt=dt)
            a, lb = rnd(rank, k, dt=dt) / k**0.5, rnd(n, rank, dt=dt)
            want = _fused_lora_ref(x.float(), w.float(), b.float(), a.float(), lb.float(), 0.5)
            report(f"fused fwd rows={rows} r={rank} {k}x{n}{' strided' if t else ''}", dt,
                   fused_lora_linear(x, w, b, a, lb, 0.5), want)
        # backward: dx through the kernel, dA / dB in torch
        ours = [rnd(41, 300, dt=dt).requires_grad_(), rnd(77, 300, dt=dt) / 17, None,
                (rnd(8, 300, dt=dt) / 17).requires_grad_(), rnd(77, 8, dt=dt).requires_grad_()]
        ref = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in ours]
        gy = rnd(41, 77, dt=dt)
        (fused_lora_linear(*ours, 2.0) * gy).sum().backward()
        (_fused_lora_ref(*ref, 2.0) * gy.float()).sum().backward()
        for name, o, r in zip("x W b A B".split(), ours, ref):
            if o is not None and o.requires_grad:
                report(f"fused bwd d{name}", dt, o.grad, r.grad)
        # multi-adapter: 8 adapters, ranks 4..32 padded to 32, some samples on the base
        L, R, k, n, bsz, seq = 8, 32, 1000, 515, 13, 37
        a, lb = torch.zeros(L, R, k, device=dev, dtype=dt), torch.zeros(L, n, R, device=dev, dtype=dt)
        for i in range(L):
            r = 4 * (i + 1)
            a[i, :r], lb[i, :, :r] = rnd(r, k, dt=dt) / k**0.5, rnd(n, r, dt=dt)
        x, base = rnd(bsz, seq, k, dt=dt), rnd(bsz, seq, n, dt=dt)
        s = torch.linspace(0.5, 2, L, device=dev)
        idx = torch.randint(-1, L, (bsz,), device=dev, generator=g)
        want = _multi_lora_ref(x.float(), base.float(), a.float(), lb.float(), s, idx)
        report(f"multi_lora {bsz}x{seq} L={L} R={R}", dt, add_multi_lora(x, base, a, lb, s, idx), want)

    # -- timing ------------------------------------------------------------------------------------
    import triton.testing

    torch.backends.cuda.matmul.allow_tf32 = True
    d, r, dt = 4096, 16, torch.bfloat16
    w, a, lb = rnd(d, d, dt=dt) / 64, rnd(r, d, dt=dt) / 64, rnd(d, r, dt=dt)
    L = 8
    As, Bs = torch.stack([rnd(r, d, dt=dt) / 64 for _ in range(L)]), torch.stack([rnd(d, r, dt=dt) for _ in range(L)])
    s = torch.ones(L, device=dev)
    print(f"\n4096x4096 Linear, bf16, r={r}: median ms (ratio to the base GEMM)")
    print(f"{'tokens':>7} {'base':>8} {'unfused':>15} {'fused':>15} {'mixed x8':>15}")
    for tokens in (16, 512, 4096, 16384):
        x = rnd(tokens, d, dt=dt)
        bsz = min(tokens, 64)
        idx = torch.arange(bsz, device=dev) % L
        t_base = triton.testing.do_bench(lambda: F.linear(x, w))
        t_unf = triton.testing.do_bench(lambda: F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), lb))
        t_fused = triton.testing.do_bench(lambda: fused_lora_linear(x, w, None, a, lb, 2.0))
        t_mixed = triton.testing.do_bench(lambda: add_multi_lora(x, F.linear(x, w), As, Bs, s, idx))
        print(f"{tokens:>7} {t_base:>8.3f} {t_unf:>8.3f} ({t_unf / t_base:4.2f}x) {t_fused:>8.3f} "
              f"({t_fused / t_base:4.2f}x) {t_mixed:>8.3f} ({t_mixed / t_base:4.2f}x)")
    print("\nall correctness checks passed" if not failures else f"\n{failures} correctness check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
