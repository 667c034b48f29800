"""Minimal repro: TorchInductor (CPU) runs a reader of a buffer before the index_put scatter into it.

Only torch is needed.  Prints versions and MISMATCH/OK; exits 1 on mismatch.
    python repro_inductor_upsample_grad.py              # torch 2.13.0+cpu: MISMATCH
    python repro_inductor_upsample_grad.py --with-fix   # same, with the scheduler fix patched in: OK

`f`: zeros -> index_put(accumulate=True) (this is exactly what the backward of
F.interpolate(mode="nearest") becomes) -> a flat pointwise reader `d` that is also copied to
channels_last (`dc`), plus an unrelated pointwise node `e` sharing an input with `d`.  Compiled
`d`/`dc` equal `a` alone: the scatter is ordered after its reader.  In a diffusers
UNet2DConditionModel the same structure appears in the backward graph (index_put ->
`/ output_scale_factor` -> channels-last copies for two convolution_backward calls) and 126/208
parameter gradients come out wrong (everything upstream of the up-block upsampler gets 0).
"""
import platform
import sys

import torch

print(f"torch {torch.__version__} | python {platform.python_version()} | {platform.platform()}")

if "--with-fix" in sys.argv:
    # Same change as upstream PR #185873: always re-apply mutation renames after recomputing deps.
    from torch._inductor import dependencies
    from torch._inductor.scheduler import SchedulerNode
    from torch.utils._ordered_set import OrderedSet

    def recompute_size_and_body(self, extra_indexing_constraints=None, recompute_sizes_body_func=None):
        fake = OrderedSet(d for d in self.read_writes.reads
                          if isinstance(d, (dependencies.WeakDep, dependencies.StarDep)))
        self._compute_attrs(extra_indexing_constraints=extra_indexing_constraints,
                            recompute_sizes_body_func=recompute_sizes_body_func)
        if fake or self.mutation_renames:
            rw = self.read_writes.with_read(fake) if fake else self.read_writes
            self.set_read_writes(rw.rename(self.mutation_renames))

    SchedulerNode.recompute_size_and_body = recompute_size_and_body
    torch._inductor.config.fx_graph_cache = False  # don't reuse an artifact compiled without the fix
    print("(scheduler fix patched in)")


def f(g, idx, a):
    e = a * 2.0                                           # shares the read of `a` with `d`
    z = torch.zeros(2, 64, 8, 8)
    z = torch.ops.aten.index_put(z, [None, None, idx[:, None], idx], g, True)  # scatter-add
    d = z + a                                             # flat [8192] pointwise reader of the scatter
    dc = d.contiguous(memory_format=torch.channels_last)  # [2,64,64] loop -> "compatible ranges" fusion
    return e, d, dc


torch.manual_seed(0)
g = torch.randn(2, 64, 16, 16)
idx = torch.arange(16) // 2          # nearest 2x upsample source indices
a = torch.randn(2, 64, 8, 8)

ref = f(g, idx, a)
out = torch.compile(f)(g, idx, a)
errs = [(r - o).abs().max().item() for r, o in zip(ref, out)]
bad = any(not torch.allclose(r, o, rtol=1e-4, atol=1e-5) for r, o in zip(ref, out))
print(f"max abs err per output (e, d, dc): {[f'{x:.3g}' for x in errs]}")
print(f"compiled d == a exactly (scatter contribution lost): {torch.equal(out[1], a)}")
print("MISMATCH" if bad else "OK")
sys.exit(1 if bad else 0)
