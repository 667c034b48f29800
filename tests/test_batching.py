"""Parameter-only transforms batched across layers (lowering/batching.py) and the Cayley solve.

Batching must change nothing but speed: the same outputs and gradients as evaluating each layer
on its own, only where the method allows it (not where PEFT draws randomness per layer), and
right when several adapters exist and the active one changes.
"""

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.lowering import batching
from adapt_compiler.passes import COUNTERS
from adapt_compiler.passes._rotation import GAUSS_JORDAN_MAX, cayley
from models import tiny_llama, token_batch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {
    "oft_neumann": lambda: ac.OFT(r=0, oft_block_size=8, targets=ALL, init_weights=False),
    "oft_exact": lambda: ac.OFT(r=0, oft_block_size=8, targets=ALL, init_weights=False, use_cayley_neumann=False),
    "oft_shared": lambda: ac.OFT(r=4, oft_block_size=0, targets=ALL, init_weights=False, block_share=True),
    "boft_one_factor": lambda: ac.BOFT(boft_block_size=8, targets=ALL, init_weights=False),
    "boft_two_factors": lambda: ac.BOFT(boft_block_size=4, boft_n_butterfly_factor=2, targets=ALL,
                                        init_weights=False),
    "hra": lambda: ac.HRA(r=4, targets=ALL, init_weights=False),
}


def _loss_and_grads(m, batch):
    m.zero_grad(set_to_none=True)
    loss = m(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.adapter_parameters()]


def _twins(spec_fn, monkeypatch, train=True):
    """(batched, per-layer) modules with the same adapter weights; the count of batched layers."""
    model = tiny_llama(layers=2)
    before = COUNTERS["layers_batched_prep"]
    fused = ac.compile(model, spec_fn(), lowering="eager").train(train)
    batch = token_batch(labels=True)
    fused(**batch)
    served = COUNTERS["layers_batched_prep"] - before
    with monkeypatch.context() as patch:
        patch.setattr(batching, "batch_parameter_transforms", lambda *a: 0)
        plain = ac.compile(model, spec_fn(), lowering="eager").train(train)
        plain.load_adapter_state_dict(fused.adapter_state_dict())
        plain(**batch)  # built while the pass is switched off
    return fused, plain, batch, served


@pytest.mark.parametrize("name", list(SPECS))
def test_batched_equals_per_layer(name, monkeypatch):
    fused, plain, batch, served = _twins(SPECS[name], monkeypatch)
    assert served == 2 * len(ALL)  # every adapted layer takes its share of one group call
    loss_f, grads_f = _loss_and_grads(fused, batch)
    loss_p, grads_p = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-6, atol=1e-7)
    for gf, gp in zip(grads_f, grads_p):
        torch.testing.assert_close(gf, gp, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_f)


@pytest.mark.parametrize("spec_fn, train, batched", [
    (lambda: ac.OFT(r=0, oft_block_size=8, targets=ALL, module_dropout=0.5), True, False),
    (lambda: ac.OFT(r=0, oft_block_size=8, targets=ALL, module_dropout=0.5), False, True),
    (lambda: ac.OFT(r=0, oft_block_size=8, targets=ALL, coft=True), True, False),
    (lambda: ac.BOFT(boft_block_size=8, targets=ALL, boft_dropout=0.5), True, False),
    (lambda: ac.BOFT(boft_block_size=8, targets=ALL, boft_dropout=0.5), False, True),
    (lambda: ac.HRA(r=4, targets=ALL, apply_GS=True), True, False),
], ids=["oft-dropout-train", "oft-dropout-eval", "coft", "boft-dropout-train", "boft-dropout-eval", "hra-gs"])
def test_only_where_layers_are_independent(spec_fn, train, batched):
    """PEFT draws module/block dropout per layer, COFT projects per layer and HRA's Gram–Schmidt is
    PEFT's sequential loop: those stay per layer."""
    before = COUNTERS["layers_batched_prep"]
    m = ac.compile(tiny_llama(layers=2), spec_fn(), lowering="eager").train(train)
    with torch.no_grad():
        m(**token_batch())
    assert (COUNTERS["layers_batched_prep"] > before) == batched


def test_switching_adapters_uses_the_active_ones_params():
    model = tiny_llama(layers=2)
    spec = lambda: ac.OFT(r=0, oft_block_size=8, targets=ALL, init_weights=False)  # noqa: E731
    both = ac.compile(model, {"a": spec(), "b": spec()}, lowering="eager").eval()
    only_b = ac.compile(model, {"b": spec()}, lowering="eager").eval()
    only_b.load_adapter_state_dict(both.adapter_state_dict("b"), "b")
    batch = token_batch()
    with torch.no_grad():
        out_a = both(**batch).logits
        both.set_adapter("b")
        out_b = both(**batch).logits
        ref_b = only_b(**batch).logits
    torch.testing.assert_close(out_b, ref_b, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out_a, out_b)


def test_report_says_which_layers_share_the_call():
    m = ac.compile(tiny_llama(layers=2), SPECS["boft_two_factors"](), lowering="eager").train()
    m(**token_batch(labels=True))
    rows = m.report().rows
    assert {r.batched_with for r in rows} == {2 * len(ALL)}
    assert "batched over 14 layers" in str(m.report())


# -- the Cayley transform -------------------------------------------------------------------------
def _skew(n, b, dtype, scale=0.5, seed=0):
    r = torch.randn(n, b, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return (0.5 * (r - r.transpose(-2, -1))).to(dtype)


@pytest.mark.parametrize("b", [1, 2, 8, GAUSS_JORDAN_MAX, GAUSS_JORDAN_MAX + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cayley_equals_the_lapack_solve(b, dtype):
    s = _skew(5, b, dtype, scale=2.0)  # large entries: elimination without pivoting still exact
    eye = torch.eye(b, dtype=dtype)
    want = torch.linalg.solve(eye + s, eye - s, left=False)
    got = cayley(s)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got @ got.transpose(-2, -1), eye.expand_as(got), rtol=tol, atol=10 * tol)


def test_cayley_gradient_float64():
    s = _skew(3, 6, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(cayley, (s,))


def test_cayley_half_precision_is_solved_wide():
    s = _skew(4, 8, torch.float32)
    got = cayley(s.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), cayley(s), rtol=2e-2, atol=2e-2)
