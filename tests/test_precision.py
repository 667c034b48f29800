"""Half-precision base weights (bfloat16; float16 where the CPU runs it) against PEFT.

* Our adapters take the base weight's dtype (PEFT with `autocast_adapter_dtype=False`); the adapter
  math runs in the adapter's dtype (the input is cast to it and the result cast back to the base
  dtype, as PEFT does), so float32 adapters on a bfloat16 base (PEFT's default) reproduce PEFT too.
* Outputs and adapter gradients are within the tolerances of docs/GUARANTEES.md of PEFT's.
* Merge folds in float32 (float64 for float64 weights) and casts once: the merged weight equals
  `merged_weight(W.float(), params.float()).to(dtype)` bit for bit, for every mergeable method.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adapt_compiler as ac
from adapt_compiler.passes import METHODS
from models import tiny_llama, token_batch
from oracle import assert_close, compare_grads, ours_from_peft, peft_twin, randomize_
from test_properties import FACTORIES, mergeable, randomize_adapter_, weight_methods

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# documented in docs/GUARANTEES.md: relative to max(1, max |reference|)
TOL = {torch.bfloat16: dict(rtol=2e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3)}


def _cpu_supports(dtype) -> bool:
    try:
        a = torch.randn(4, 4).to(dtype)
        torch.nn.functional.linear(a, a)
        torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
        return True
    except RuntimeError:
        return False


DTYPES = [torch.bfloat16] + ([torch.float16] if _cpu_supports(torch.float16) else [])


def _compare(dtype, dora: bool, fp32_adapters: bool):
    import peft

    base = tiny_llama().to(dtype)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_dora=dora)
    import copy

    pm = peft.get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=fp32_adapters).eval()
    randomize_(pm, ("lora_",))
    adapter_dtype = torch.float32 if fp32_adapters else dtype
    assert all(p.dtype == adapter_dtype for n, p in pm.named_parameters() if "lora_" in n)
    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=ATTN, use_dora=dora), lowering="eager")
    assert all(p.dtype == dtype for p in m.adapter_parameters()), "adapters take the base dtype"
    if fp32_adapters:
        for p in m.adapter_parameters():
            p.data = p.data.float()
    from peft import get_peft_model_state_dict

    m.load_adapter_state_dict(get_peft_model_state_dict(pm))
    batch = token_batch()
    ours, theirs = m(**batch).logits, pm(**batch).logits
    assert ours.dtype == theirs.dtype == dtype
    assert_close(ours, theirs, what=f"{dtype} logits", **TOL[dtype])
    ours.float().square().mean().backward()
    theirs.float().square().mean().backward()
    for p in m.adapter_parameters():
        assert p.grad.dtype == adapter_dtype
    compare_grads(m, pm, **TOL[dtype])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
def test_half_base_matches_peft_same_dtype_adapters(dtype, dora):
    """Adapters in the base dtype on both sides (PEFT: autocast_adapter_dtype=False)."""
    _compare(dtype, dora, fp32_adapters=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
def test_float32_adapters_on_half_base_match_peft_default(dtype):
    """PEFT's default upcasts adapters to float32; with float32 adapters ours computes as PEFT does."""
    _compare(dtype, dora=False, fp32_adapters=True)


def test_lora_merge_in_float32_then_cast_and_close_to_peft():
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16)
    m = ac.compile(base, ac.LoRA(r=4, alpha=8, targets=["0"], init=False), lowering="eager")
    randomize_adapter_(m, 1, scale=0.5)
    sd = m.adapter_state_dict()
    w = base[0].weight.detach()
    a = sd["base_model.model.0.lora_A.weight"]
    b = sd["base_model.model.0.lora_B.weight"]
    m.merge()
    merged = m.merged_module()[0].weight
    expected = (w.float() + 2.0 * (b.float() @ a.float())).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)
    assert torch.equal(base[0].weight, w), "the user's weight changed"
    # PEFT rounds ΔW to bf16 and adds in bf16 (two roundings): within one bf16 ulp of ours
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), autocast_adapter_dtype=False)
    with torch.no_grad():
        pm.base_model.model[0].base_layer.weight.copy_(w)
    pm.load_state_dict({k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, strict=False)
    theirs = pm.merge_and_unload()[0].weight.detach()
    delta = (2.0 * (b.float() @ a.float())).abs()
    bound = torch.finfo(torch.bfloat16).eps * (merged.float().abs() + delta)  # ~1 rounding of each
    assert ((merged.float() - theirs.float()).abs() <= bound).all()


def test_float64_merge_stays_float64():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8)).double()
    m = ac.compile(base, ac.LoRA(r=2, alpha=2, targets=["0"], init=False), lowering="eager")
    sd = m.adapter_state_dict()
    expected = base[0].weight + sd["base_model.model.0.lora_B.weight"] @ sd["base_model.model.0.lora_A.weight"]
    m.merge()
    merged = m.merged_module()[0].weight
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in weight_methods() if n in FACTORIES])
@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_method_in_bfloat16(name, data):
    """bf16 base: outputs stay bf16 and near the float32 result; merge = float32 fold cast once."""
    case = FACTORIES[name](data.draw)
    torch.manual_seed(0)
    base32 = nn.Sequential(nn.Linear(case.d_in, case.d_out)).eval()
    base16 = nn.Sequential(nn.Linear(case.d_in, case.d_out)).to(torch.bfloat16).eval()
    with torch.no_grad():
        base16[0].weight.copy_(base32[0].weight.to(torch.bfloat16))
        base16[0].bias.copy_(base32[0].bias.to(torch.bfloat16))
        base32[0].weight.copy_(base16[0].weight.float())
        base32[0].bias.copy_(base16[0].bias.float())
    spec = case.spec.replace(targets=["0"])
    m16 = ac.compile(base16, spec, lowering="eager").eval()
    m32 = ac.compile(base32, spec, lowering="eager").eval()
    randomize_adapter_(m16, 3)
    with torch.no_grad():
        for (n, p16), (_, p32) in zip(m16.named_parameters(), m32.named_parameters()):
            p32.copy_(p16.float())
    x = torch.randn(3, case.d_in).to(torch.bfloat16)
    y16, y32 = m16(x), m32(x.float())
    assert y16.dtype == torch.bfloat16, f"{name}: a bf16 base gave {y16.dtype} outputs"
    assert_close(y16, y32, what=f"{name}: bf16 vs float32", **TOL[torch.bfloat16])
    if not mergeable(name):
        return
    slot = next(iter(m16.slots.values()))
    method, layer = METHODS[name], slot.layer
    p = {k: v.detach().float() if v.is_floating_point() else v for k, v in slot.params("default").items()}
    w0 = base16[0].weight.detach()
    expected = method.merged_weight(m16.state.specs["default"], layer, p, w0.float(), base16[0].bias.float())[0]
    m16.merge()
    assert torch.equal(m16.merged_module()[0].weight, expected.to(torch.bfloat16)), f"{name}: not a float32 fold"
    assert m16(x).dtype == torch.bfloat16
    m16.unmerge()
    assert torch.equal(m16(x), y16)
