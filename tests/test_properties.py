"""Property tests (hypothesis, bounded) for every registered weight method.

For random layer shapes, ranks and block sizes that each method accepts:

* identity at init (where the method starts as the base layer),
* merged == unmerged (merge(), merged_module(), and the weight-side evaluation order),
* export == eager (the AdaptedModule exported unmerged and merged),
* torch.autograd.gradcheck in float64 of the method's adapted-layer function (`method.forward` with
  x, W, b and every adapter parameter as inputs) and of its merge rule (`merged_weight`).

Each registered weight method needs a *spec factory* in FACTORIES below (hypothesis-drawn sizes ->
a spec plus the layer shape it accepts). A method that is registered without one fails
`test_every_weight_method_has_a_factory`: adding a method means adding its factory here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adapt_compiler as ac
from adapt_compiler.passes import METHODS
from adapt_compiler.passes.match import describe_layer
from adapt_compiler.passes.method import GraphMethod
from oracle import assert_close

SETTINGS = settings(max_examples=5, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Case:
    d_in: int
    d_out: int
    spec: object
    identity: bool = True  # the adapted layer equals the base layer at init
    # inputs whose gradient is deliberately not the mathematical one (e.g. DoRA's detached norm)
    no_gradcheck: tuple[str, ...] = ()


def make(method: str, **kwargs):
    """The registered spec type of `method`, built from PEFT-named fields; a clear failure if a field is absent."""
    spec_type = METHODS[method].spec_type
    names = {f.name for f in fields(spec_type)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        pytest.fail(f"{spec_type.__name__} has no field(s) {unknown} (fields: {sorted(names)}); "
                    f"update the spec factory for {method!r} in tests/test_properties.py.")
    return spec_type(**kwargs)


def first_field(method: str, *candidates: str) -> str:
    names = {f.name for f in fields(METHODS[method].spec_type)}
    for c in candidates:
        if c in names:
            return c
    pytest.fail(f"{METHODS[method].spec_type.__name__}: none of the fields {candidates}; update tests/test_properties.py.")


dims = st.integers(1, 6)


def lora_case(draw) -> Case:
    r = draw(st.integers(1, 4))
    variant = draw(st.sampled_from(["plain", "rslora", "dora"]))
    spec = make("lora", r=r, alpha=draw(st.sampled_from([1, 2, 8])), rslora=variant == "rslora",
                use_dora=variant == "dora")
    # DoRA detaches the weight norm (as PEFT does), so d/dW, d/dA, d/dB are not the numerical ones
    excl = ("weight", "lora_A", "lora_B") if variant == "dora" else ()
    return Case(draw(dims), draw(dims), spec, no_gradcheck=excl)


def loha_case(draw) -> Case:
    return Case(draw(dims), draw(dims), make("loha", r=draw(st.integers(1, 3)), alpha=draw(st.sampled_from([1, 4]))))


def lokr_case(draw) -> Case:
    d_in = draw(st.sampled_from([1, 2, 4, 6]))
    d_out = draw(st.sampled_from([1, 2, 3, 4, 6]))
    return Case(d_in, d_out, make("lokr", r=draw(st.integers(1, 3)), alpha=draw(st.sampled_from([1, 4]))))


def adalora_case(draw) -> Case:
    init_r = draw(st.integers(1, 4))
    spec = make("adalora", init_r=init_r, target_r=draw(st.integers(1, init_r)), total_step=10)
    return Case(draw(dims), draw(dims), spec)


def oft_case(draw) -> Case:
    b = draw(st.integers(2, 4))
    return Case(b * draw(st.integers(1, 2)), draw(dims), make("oft", r=0, oft_block_size=b))


def boft_case(draw) -> Case:
    factor = draw(st.sampled_from([1, 2]))
    if factor == 1:
        b = draw(st.integers(2, 4))
        d_in = b * draw(st.integers(1, 2))
    else:  # butterfly: even block size and an even number of blocks
        b = 2
        d_in = draw(st.sampled_from([4, 8]))
    spec = make("boft", boft_block_size=b, boft_block_num=0, boft_n_butterfly_factor=factor)
    return Case(d_in, draw(dims), spec)


def hra_case(draw) -> Case:
    r = draw(st.sampled_from([2, 4]))
    return Case(draw(st.integers(r, 6)), draw(dims), make("hra", r=r))


def bone_case(draw) -> Case:
    r = draw(st.integers(1, 3))
    d_in, d_out = r * draw(st.integers(1, 2)), r * draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["balance", "bat", "mini"]))
    kw = {"r": r, "mode": mode}
    if mode == "mini":
        kw["mini_r"] = draw(st.sampled_from([k for k in (1, 2) if d_out % k == 0]))
    return Case(d_in, d_out, make("bone", **kw))


FACTORIES: dict[str, Callable] = {
    "lora": lora_case,
    "loha": loha_case,
    "lokr": lokr_case,
    "adalora": adalora_case,
    "oft": oft_case,
    "boft": boft_case,
    "hra": hra_case,
    "bone": bone_case,
}


def weight_methods() -> list[str]:
    return sorted(n for n, m in METHODS.items() if not isinstance(m, GraphMethod))


def mergeable(name: str) -> bool:
    return METHODS[name].merge_kind != "none"


def randomize_adapter_(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Non-trivial values for every adapter parameter (buffers such as AdaLoRA's ranknum are state)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point():
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype))


def export_module(m, x, merge: bool):
    return ac.export(m, (x,), merge=merge)


def test_every_weight_method_has_a_factory():
    missing = [n for n in weight_methods() if n not in FACTORIES]
    assert not missing, (
        f"registered weight method(s) {missing} have no spec factory: add one to FACTORIES in "
        f"tests/test_properties.py (hypothesis-drawn sizes -> a spec and a layer shape it accepts)."
    )


@pytest.mark.parametrize("name", weight_methods())
@SETTINGS
@given(data=st.data())
def test_adapted_linear_properties(name, data):
    if name not in FACTORIES:
        pytest.fail(f"{name}: no spec factory; add one to FACTORIES (see test_every_weight_method_has_a_factory)")
    case = FACTORIES[name](data.draw)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    bias = data.draw(st.booleans(), label="bias")
    batch = data.draw(st.integers(1, 3), label="batch")
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(case.d_in, case.d_out, bias=bias)).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(batch, case.d_in)
    spec = case.spec.replace(targets=["0"])
    m = ac.compile(base, spec, lowering="eager").eval()

    if case.identity:
        assert_close(m(x), base(x), what=f"{name}: identity at init")

    randomize_adapter_(m, seed)
    y = m(x)
    # the weight-side evaluation order (W' then one GEMM) gives the activation-side result
    mw = ac.compile(base, spec.replace(order="weight"), lowering="eager").eval()
    mw.load_state_dict(m.state_dict())
    if mergeable(name):
        assert_close(mw(x), y, what=f"{name}: weight order == activation order")
        m.merge()
        assert_close(m(x), y, what=f"{name}: merged == unmerged")
        m.unmerge()
        assert torch.equal(m(x), y), f"{name}: unmerge did not restore the unmerged output bit-for-bit"
        assert_close(m.merged_module()(x), y, what=f"{name}: merged_module() == unmerged")
    ep = export_module(m, x, merge=False)
    assert_close(ep.module()(x), y, what=f"{name}: export == eager")
    if mergeable(name):
        ep = export_module(m, x, merge=True)
        assert_close(ep.module()(x), y, what=f"{name}: merged export == eager")
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the user's model changed"


@pytest.mark.parametrize("name", weight_methods())
@SETTINGS
@given(data=st.data())
def test_gradcheck_float64(name, data):
    if name not in FACTORIES:
        pytest.fail(f"{name}: no spec factory; add one to FACTORIES (see test_every_weight_method_has_a_factory)")
    case = FACTORIES[name](data.draw)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    bias = data.draw(st.booleans(), label="bias")
    torch.manual_seed(seed)
    lin = nn.Linear(case.d_in, case.d_out, bias=bias).double()
    method, spec = METHODS[name], case.spec
    layer = describe_layer("lin", lin)
    method.check(spec, layer)
    weight = lin.weight.detach().clone()
    params = {k: v.detach().clone() for k, v in method.init_params(spec, layer, weight).items()}
    g = torch.Generator().manual_seed(seed)
    for k, v in params.items():
        if k not in method.buffer_names and v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.5)
        assert v.dtype == torch.float64, f"{name}: init_params made {k} in {v.dtype} for a float64 weight"
    names = list(params)
    b = lin.bias.detach().clone() if bias else None
    x = torch.randn(2, case.d_in, dtype=torch.float64)

    def grad_ok(key, t):
        return t is not None and key not in case.no_gradcheck and key not in method.buffer_names

    for key, t in [("x", x), ("weight", weight), ("bias", b), *params.items()]:
        if grad_ok(key, t):
            t.requires_grad_(True)

    def adapted(x, w, b, *ps):
        return method.forward(spec, layer, dict(zip(names, ps)), x, w, b, False)

    assert torch.autograd.gradcheck(adapted, (x, weight, b, *[params[n] for n in names]), eps=1e-6, atol=1e-5)
    if mergeable(name):

        def merged(w, b, *ps):
            return method.merged_weight(spec, layer, dict(zip(names, ps)), w, b)[0]

        assert torch.autograd.gradcheck(merged, (weight, b, *[params[n] for n in names]), eps=1e-6, atol=1e-5)
