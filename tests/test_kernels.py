"""The Triton LoRA kernels against their pure-torch references (TRITON_INTERPRET=1 on CPU).

Shapes are odd on purpose (rows 1, 9, 41, 341; ranks 1, 8, 16; K, N not multiples of a block) and
small, so the interpreter stays fast. Without a GPU and without TRITON_INTERPRET=1 the kernel
launches are skipped; the references and the ops' CPU paths are tested either way.
"""

import pytest
import torch

from adapt_compiler.lowering import kernels
from adapt_compiler.lowering.kernels import add_multi_lora, fused_lora_linear
from adapt_compiler.lowering.kernels.fused_lora import _fused_lora_ref
from adapt_compiler.lowering.kernels.multi_lora import _multi_lora_ref, _segments

K, N = 37, 23
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not (kernels.HAVE_TRITON and (kernels.INTERPRET or torch.cuda.is_available())),
    reason="needs triton with TRITON_INTERPRET=1 (CPU) or a GPU",
)
# (dtype, atol, rtol) against a float32 reference
TOLS = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (1e-1, 1e-2)}


def _kernel_mode():
    if DEVICE == "cuda" and not kernels.INTERPRET:
        import contextlib

        return contextlib.nullcontext()
    return kernels.interpret_kernels()


def _t(*shape, dtype=torch.float32, transposed=False):
    if transposed:  # a non-contiguous view with the same values layout semantics
        return torch.randn(*reversed(shape), dtype=torch.float32).to(DEVICE, dtype).t()
    return torch.randn(*shape, dtype=torch.float32).to(DEVICE, dtype)


def _close(got, want, dtype):
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol * max(1.0, want.abs().max().item()), rtol=rtol)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 9, 41, 341])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_fused_lora_forward_matches_reference(rows, rank):
    strided = rows % 2 == 1 and rank != 8  # non-contiguous x and W on some shapes
    x, w = _t(rows, K, transposed=strided), _t(N, K, transposed=strided)
    b, a, lb = _t(N), _t(rank, K), _t(N, rank)
    with _kernel_mode():
        y = fused_lora_linear(x, w, b, a, lb, 0.75)
    _close(y, _fused_lora_ref(x, w, b, a, lb, 0.75), torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_lora_low_precision(dtype):
    x, w, a, lb = _t(2, 9, K, dtype=dtype), _t(N, K, dtype=dtype), _t(8, K, dtype=dtype), _t(N, 8, dtype=dtype)
    with _kernel_mode():
        y = fused_lora_linear(x, w, None, a, lb, 2.0)
    assert y.dtype == dtype and y.shape == (2, 9, N)
    _close(y, _fused_lora_ref(x.float(), w.float(), None, a.float(), lb.float(), 2.0), dtype)


@needs_kernel
@pytest.mark.parametrize("rows,rank", [(9, 1), (41, 16)])
def test_fused_lora_backward_matches_reference(rows, rank):
    def leaves():
        torch.manual_seed(rows)
        ts = [_t(rows, K), _t(N, K), _t(N), _t(rank, K), _t(N, rank)]
        return [t.requires_grad_(i != 2) for i, t in enumerate(ts)]

    ours, theirs = leaves(), leaves()
    g = _t(rows, N)
    with _kernel_mode():
        (fused_lora_linear(*ours, 0.5) * g).sum().backward()
    (_fused_lora_ref(*theirs, 0.5) * g).sum().backward()
    for name, o, t in zip(["x", "W", "b", "A", "B"], ours, theirs):
        if t.grad is not None:
            _close(o.grad, t.grad, torch.float32)


def _multi_inputs(bsz, seq, ranks, transposed=False):
    L, R = len(ranks), max(ranks)
    a, b = torch.zeros(L, R, K, device=DEVICE), torch.zeros(L, N, R, device=DEVICE)
    for i, r in enumerate(ranks):  # ranks padded with zeros, like the stacked slot params
        a[i, :r], b[i, :, :r] = _t(r, K), _t(N, r)
    x = _t(bsz * seq, K, transposed=transposed).reshape(bsz, seq, K) if not transposed else \
        _t(bsz * seq, K, transposed=True)
    base = _t(bsz * seq, N).reshape(*x.shape[:-1], N)
    idx = torch.tensor([(3 * i) % (L + 1) - 1 for i in range(bsz)], device=DEVICE)  # includes -1
    return x, base, a, b, torch.linspace(0.5, 2.0, L, device=DEVICE), idx


def _per_sample(x, base, a, b, s, idx):
    bsz = idx.shape[0]
    x3, out = x.reshape(bsz, -1, K), base.reshape(bsz, -1, N).clone()
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            out[i] += s[j] * (x3[i] @ a[j].T) @ b[j].T
    return out.reshape(base.shape)


@pytest.mark.parametrize("transposed", [False, True])
def test_multi_lora_reference_is_per_sample_lora(transposed):
    args = _multi_inputs(5, 7, [1, 8, 16], transposed)
    _close(_multi_lora_ref(*args), _per_sample(*args), torch.float32)


@needs_kernel
@pytest.mark.parametrize("bsz,seq,ranks", [(1, 1, [8]), (9, 1, [1, 8, 16]), (3, 41, [16, 4]), (11, 31, [8, 1, 16])])
@pytest.mark.parametrize("transposed", [False, True])
def test_multi_lora_kernel_matches_reference(bsz, seq, ranks, transposed):
    args = _multi_inputs(bsz, seq, ranks, transposed)
    with _kernel_mode():
        y = add_multi_lora(*args)
    _close(y, _multi_lora_ref(*args), torch.float32)


@needs_kernel
def test_multi_lora_backward_matches_reference():
    def leaves():
        torch.manual_seed(3)
        x, base, a, b, s, idx = _multi_inputs(4, 5, [8, 2])
        return [x.requires_grad_(), base.requires_grad_(), a.requires_grad_(), b.requires_grad_(), s, idx]

    ours, theirs = leaves(), leaves()
    g = torch.randn_like(ours[1])
    with _kernel_mode():
        (add_multi_lora(*ours) * g).sum().backward()
    (_multi_lora_ref(*theirs) * g).sum().backward()
    for o, t in zip(ours[:4], theirs[:4]):
        _close(o.grad, t.grad, torch.float32)


def test_segments_cover_every_adapter_token_once():
    idx = torch.tensor([2, -1, 0, 2, 2, 1, -1, 0, 2])
    order, tile_adapter, start, end = _segments(idx, 3, block_m=2)
    seen = []
    for t in range(start.shape[0]):
        for p in range(start[t], end[t]):
            row = order[p].item()
            assert idx[row] == tile_adapter[t]
            seen.append(row)
    assert sorted(seen) == [i for i, j in enumerate(idx.tolist()) if j >= 0]


def test_ops_are_traceable_and_pass_opcheck():
    x, w, b, a, lb = torch.randn(3, 5, K), torch.randn(N, K), torch.randn(N), torch.randn(4, K), torch.randn(N, 4)
    torch.library.opcheck(torch.ops.adapt_compiler.fused_lora_linear.default, (x, w, b, a, lb, 0.5),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    margs = _multi_inputs(3, 4, [4, 2])
    torch.library.opcheck(torch.ops.adapt_compiler.multi_lora.default, tuple(t.cpu() for t in margs),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x, w, b, a, lb):
        return fused_lora_linear(x, w, b, a, lb, 0.5).relu()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b, a, lb), f(x, w, b, a, lb))
