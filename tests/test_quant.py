"""Quantized base models (issue 16): bitsandbytes 4/8-bit and torchao int8, trained, merged, exported.

* Outputs and adapter gradients equal PEFT's over the same quantized model (loaded through
  transformers' `quantization_config`, or quantized by hand), for each method PEFT supports there.
* The user's model is unchanged; no full-precision copy of a quantized weight is kept (neither in
  the graph nor saved for backward); bitsandbytes' in-place CPU repack cannot reach our graphs.
* Methods PEFT does not support over a kind, and quantized kinds we do not know, are refused by
  name before anything is created.
* Checkpoints load both ways; one trained over another quantization loads with a warning naming both.
* merged_module() dequantizes (or re-quantizes like PEFT's merge_and_unload, reporting the rounding);
  an unmerged torchao int8 adapter exports and packages; bitsandbytes packaging is a clear error.

Eager lowering throughout, except one Inductor training step.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

from quant_models import assert_same_state, load_quantized, model_state, quantize_by_hand, require, save_float_llama

bnb = require("bitsandbytes")
torchao = require("torchao")

import peft  # noqa: E402

import adapt_compiler as ac  # noqa: E402
from adapt_compiler.checkpoint import QuantizationMismatchWarning  # noqa: E402
from adapt_compiler.errors import AdapterError, ExportError  # noqa: E402
from models import tiny_llama, token_batch  # noqa: E402
from oracle import (assert_close, check_vs_peft, compare_grads, logits_of, peft_pair, peft_twin,  # noqa: E402
                    randomize_, square_loss)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# method -> (PEFT config, our spec, names of the adapter tensors to randomise)
METHODS = {
    "lora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN),
             lambda: ac.LoRA(r=4, alpha=8, targets=ATTN), ("lora_",)),
    "dora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_dora=True),
             lambda: ac.LoRA(r=4, alpha=8, targets=ATTN, use_dora=True), ("lora_A", "lora_B")),
    "loha": (lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=ATTN),
             lambda: ac.LoHa(r=4, alpha=8, targets=ATTN), ("hada_",)),
    "lokr": (lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=ATTN),
             lambda: ac.LoKr(r=4, alpha=8, targets=ATTN), ("lokr_",)),
    "oft": (lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=ATTN),
            lambda: ac.OFT(oft_block_size=16, targets=ATTN), ("oft_",)),
    "adalora": (lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=ATTN, total_step=10),
                lambda: ac.AdaLoRA(init_r=4, target_r=2, alpha=8, targets=ATTN, total_step=10), ("lora_",)),
    "boft": (lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=ATTN),
             lambda: ac.BOFT(boft_block_size=8, boft_n_butterfly_factor=1, targets=ATTN), ("boft_",)),
    "bone": (lambda: peft.MissConfig(r=16, target_modules=ATTN),
             lambda: ac.MiSS(r=16, targets=ATTN), ("miss_",)),
}

# every method PEFT 0.21.2 supports over each kind is covered somewhere; LoRA over every kind
PARITY = [
    ("nf4", "lora"), ("nf4", "dora"), ("nf4", "oft"), ("nf4", "adalora"), ("nf4", "boft"), ("nf4", "bone"),
    ("fp4-bf16-compute", "lora"), ("fp4", "lora"), ("fp4", "dora"),
    ("int8", "lora"), ("int8", "loha"), ("int8", "lokr"),
    ("torchao_int8", "lora"), ("torchao_int8", "dora"), ("torchao_int8", "lokr"), ("torchao_int8", "oft"),
]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_float_llama(tmp_path_factory.mktemp("float_llama"))


@pytest.fixture(scope="module")
def bases(float_dir):
    """scheme -> a quantized tiny Llama (built once per module, on first use). The tests never
    modify these (ours never does; PEFT runs on deep copies)."""
    cache = {}

    def get(scheme):
        if scheme not in cache:
            if scheme == "fp4-bf16-compute":  # by hand: float32 model, fp4 without double quant, bf16 GEMMs
                cache[scheme] = quantize_by_hand(tiny_llama(), "fp4", compute_dtype=torch.bfloat16)
            else:
                cache[scheme] = load_quantized(float_dir, scheme)
        return cache[scheme]

    return get


def _spec(method):
    return METHODS[method][1]()


# -- numerics against PEFT -------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,method", PARITY, ids=[f"{s}-{m}" for s, m in PARITY])
def test_training_matches_peft(bases, scheme, method):
    """Training forward (logits) and every adapter gradient equal PEFT's over the same quantized model."""
    base = bases(scheme)
    cfg, spec, keys = METHODS[method]
    check_vs_peft(base, cfg(), spec(), token_batch(), keys=keys, train=True)


@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao_int8"])
def test_eval_matches_the_kernels_training_numerics(bases, scheme):
    """In eval our graph keeps each kind's training numerics. torchao has one path: equal to PEFT.
    bitsandbytes computes eval differently on CPU (4-bit: its AVX512-BF16 inference kernel with bf16
    scales, after repacking the weight; 8-bit: LLM.int8 with int8 activations), so there we equal
    PEFT's training-mode forward exactly, and PEFT's eval forward within that kernel difference."""
    base = bases(scheme)
    pm, m = peft_pair(base, METHODS["lora"][0](), _spec("lora"), keys=("lora_",))
    batch = token_batch()
    m.eval()
    with torch.no_grad():
        ours = logits_of(m(**batch))
        pm.train()
        train_numerics = logits_of(pm(**batch))
        pm.eval()
        theirs = logits_of(pm(**batch))
    assert_close(ours, train_numerics, rtol=1e-5)
    if scheme == "torchao_int8":
        assert_close(ours, theirs, rtol=1e-5)
    else:
        err = (ours - theirs).abs().max().item() / theirs.abs().max().item()
        assert err < 2e-2, f"PEFT's eval kernel differs by {err:.2%} of the output's scale (documented: < 2 %)"


def test_second_step_and_new_shape(bases):
    """After an optimizer step, and for another batch shape (dynamic dims), still PEFT's numbers."""
    pm, m = peft_pair(bases("nf4"), METHODS["lora"][0](), _spec("lora"), keys=("lora_",))
    pm.train()
    m.train()
    opt_ours = torch.optim.SGD(m.adapter_parameters(), lr=0.5)
    opt_peft = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for batch in (token_batch(2, 7), token_batch(3, 5, seed=2)):
        ours, theirs = logits_of(m(**batch)), logits_of(pm(**batch))
        assert_close(ours, theirs, rtol=1e-4)
        square_loss(ours).backward()
        square_loss(theirs).backward()
        compare_grads(m, pm, rtol=1e-4)
        opt_ours.step(), opt_peft.step(), opt_ours.zero_grad(), opt_peft.zero_grad()


def test_inductor_training_step_matches_eager(bases):
    """The one compiled check: the quantized ops are extern kernels in Inductor's graph; the guard
    compares the compiled step's loss gradients with the eager graph, and the result equals PEFT."""
    pm, _ = peft_pair(bases("nf4"), METHODS["lora"][0](), _spec("lora"), keys=("lora_",))
    m = ac.compile(bases("nf4"), _spec("lora"))  # Inductor, verified against eager on its first call
    m.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    before = frozenset(_dense_weights_alive(m, m, pm))
    pm.train()
    m.train()
    batch = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # a CompilerMismatchWarning would fail here
        ours = logits_of(m(**batch))
    theirs = logits_of(pm(**batch))
    assert_close(ours, theirs, rtol=1e-4)
    square_loss(ours).backward()
    square_loss(theirs).backward()
    compare_grads(m, pm, rtol=1e-4, atol=1e-5)
    assert m.report().checks[0][1].status == "passed"
    # the compiled graph's constants and the guard's reference state hold no dequantized weight
    alive = _dense_weights_alive(m, m, pm, before=before)
    assert not alive, f"{len(alive)} full-precision copies of quantized weights outlive the compiled step"


# -- memory: no full-precision copy of a quantized weight ------------------------------------------
@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao_int8"])
def test_no_full_precision_weight_is_kept(bases, scheme):
    """Neither the graph nor autograd's saved tensors hold a float tensor of a quantized weight's
    shape (a dequantized W); the graph reads only the packed operands, by FQN."""
    base = bases(scheme)
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, use_dora=True), lowering="eager")
    m.train()
    batch = token_batch()
    shapes = {(i.out_features, i.in_features) for i in m.table.quant.values()}
    shapes |= {(k, n) for n, k in shapes}
    plain = {p.data_ptr() for p in base.parameters() if type(p) is nn.Parameter and p.is_floating_point()}
    saved = []

    def pack(t):
        if t.is_floating_point() and tuple(t.shape) in shapes and t.data_ptr() not in plain:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = square_loss(m(**batch))
    loss.backward()
    assert not saved, f"full-precision weights saved for backward: {saved[:5]}"
    gm = m.latest_graph()
    for fqn, info in m.table.quant.items():
        reads = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(fqn + ".")}
        assert reads and all(r.split(".")[-1].startswith("weight") for r in reads), reads
        for r in reads:
            t = gm.get_parameter(r) if r in dict(gm.named_parameters()) else gm.get_buffer(r)
            assert not (t.is_floating_point() and t.numel() >= info.out_features * info.in_features), \
                f"{r}: a full-precision {tuple(t.shape)} tensor in the graph"
            assert t.untyped_storage().data_ptr() in _storages(base), f"{r}: a copy, not the model's own tensor"


def _dense_weights_alive(m, *models, before=frozenset()) -> list:
    """Every live tensor (as the garbage collector sees them) that could be a dequantized weight: a
    float tensor holding memory, of a quantized layer's (out, in) or (in, out) shape, that is none of
    the models' own float parameters or buffers (fake and meta tensors hold no memory) and was not
    alive already (`before`: the ids this returned earlier, e.g. other tests' models)."""
    shapes = {(i.out_features, i.in_features) for i in m.table.quant.values()}
    shapes |= {(k, n) for n, k in shapes}
    owned = {t.untyped_storage().data_ptr() for mod in models for t in [*mod.parameters(), *mod.buffers()]
             if t.is_floating_point() and type(t) in (torch.Tensor, nn.Parameter)}
    gc.collect()
    # a dequantized W is a plain tensor (subclasses such as fake or functional tensors hold no data)
    return [id(o) for o in gc.get_objects()
            if type(o) is torch.Tensor and id(o) not in before and o.device.type != "meta"
            and o.is_floating_point() and tuple(o.shape) in shapes and o.untyped_storage().data_ptr() not in owned]


@pytest.mark.parametrize("scheme", ["nf4", "torchao_int8"])
def test_no_dequantized_weight_alive_between_steps(bases, scheme):
    """After training steps (forward, backward, optimizer), nothing holds a full-precision copy of a
    quantized weight: not the graphs, not a cache of the method (DoRA's weight norm, the eval order's
    W + ΔW), not the lowering. The issue forbids one that persists between steps."""
    base = bases(scheme)
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, use_dora=True), lowering="eager")
    m.train()
    opt = torch.optim.AdamW(m.adapter_parameters(), lr=1e-3)
    batch = token_batch()
    before = frozenset(_dense_weights_alive(m, base, m))
    for _ in range(2):
        square_loss(m(**batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    alive = _dense_weights_alive(m, base, m, before=before)
    assert not alive, f"{len(alive)} full-precision copies of quantized weights outlive the training steps"
    m.eval()
    with torch.no_grad():
        m(**batch)  # eval folds ΔW into the dequantized weight, transiently
    alive = _dense_weights_alive(m, base, m, before=before)
    assert not alive, f"{len(alive)} full-precision W + ΔW outlive the eval forward"


def _storages(model):
    out = set()
    for mod in model.modules():
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            for x in ([t.qdata, t.scale] if hasattr(t, "qdata") else [t]):
                out.add(x.untyped_storage().data_ptr())
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if state is not None:
            out |= {t.untyped_storage().data_ptr() for t in (state.absmax, state.offset) if t is not None}
            if state.nested:
                out |= {state.state2.absmax.untyped_storage().data_ptr(), state.state2.code.untyped_storage().data_ptr()}
        for holder in (getattr(mod, "state", None), getattr(mod, "weight", None)):  # bitsandbytes 8-bit scales
            scb = getattr(holder, "SCB", None)
            if scb is not None:
                out.add(scb.untyped_storage().data_ptr())
    return out


def test_graph_shows_the_quantized_op_next_to_the_adapter(bases):
    """The plan's decision sits on the node: training stays on the activation side over a quantized
    layer (a weight-side W' would be saved in full precision); eval may fold ΔW into the dequantized
    weight, transiently."""
    base = bases("nf4")
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, order="weight"), lowering="eager")
    m.train()
    m(**token_batch())
    slot_nodes = [n for n in m.latest_graph().graph.nodes if n.op == "call_module" and "ac_slots" in n.target]
    assert slot_nodes and all(n.kwargs["orders"] == {"default": "activation"} for n in slot_nodes)
    weight_arg = slot_nodes[0].args[1]
    assert isinstance(weight_arg, tuple) and weight_arg[0].target.endswith("q_proj.weight")
    assert [a.target.rsplit(".", 1)[-1] for a in weight_arg[1:5]] == [
        "weight__absmax", "weight__nested_absmax", "weight__nested_code", "weight__nested_offset"]
    m.eval()
    with torch.no_grad():
        out = m(**token_batch())
    orders = {n.kwargs["orders"]["default"] for n in m.latest_graph().graph.nodes
              if n.op == "call_module" and "ac_slots" in n.target}
    assert orders == {"weight"}
    m2 = ac.compile(base, ac.LoRA(r=4, targets=ATTN, order="activation"), lowering="eager")
    m2.load_adapter_state_dict(m.adapter_state_dict())
    m2.eval()
    with torch.no_grad():
        assert_close(logits_of(m2(**token_batch())), logits_of(out), rtol=1e-5)


# -- the user's model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao_int8"])
def test_users_model_is_unchanged(bases, scheme, tmp_path):
    base = bases(scheme)
    before = model_state(base)
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, init=False), lowering="eager")
    m.train()
    square_loss(m(**token_batch())).backward()
    m.eval()
    with torch.no_grad():
        m(**token_batch())
    m.merged_module()
    m.save_adapter(tmp_path / "a")
    assert_same_state(before, model_state(base))


def test_capture_restores_forwards_on_error():
    from adapt_compiler.quant import quantized_leaves
    from adapt_compiler.quant.kinds import describe
    from adapt_compiler.quant import KINDS

    base = quantize_by_hand(tiny_llama(), "nf4")
    infos = {f: describe(mod) for f, mod in base.named_modules() if describe(mod) is not None}
    operands = {f: KINDS[i.kind].operands(dict(base.named_modules())[f]) for f, i in infos.items()}
    before = model_state(base)
    with pytest.raises(RuntimeError, match="boom"):
        with quantized_leaves(base, infos, operands):
            assert "forward" in base.model.layers[0].self_attn.q_proj.__dict__
            raise RuntimeError("boom")
    assert_same_state(before, model_state(base))


def _avx512bf16_repack_happens() -> bool:
    layer = quantize_by_hand(nn.Sequential(nn.Linear(64, 64)), "nf4")[0].eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def test_bitsandbytes_cpu_repack_cannot_reach_our_graphs():
    """bitsandbytes rewrites a 4-bit weight in place on an eager eval no-grad forward (AVX512-BF16
    CPUs). After compile: our graphs keep the layout they read. Before compile: a clear refusal."""
    if not _avx512bf16_repack_happens():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    base = quantize_by_hand(tiny_llama(), "nf4")
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, init=False), lowering="eager")
    m.eval()
    batch = token_batch()
    with torch.no_grad():
        before = logits_of(m(**batch))
        base.eval()(**batch)  # the user's own eval forward: bnb repacks the user's weights
    assert base.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu
    m.invalidate_graphs()  # a fresh capture after the repack, too
    with torch.no_grad():
        assert torch.equal(logits_of(m(**batch)), before)
    with pytest.raises(AdapterError, match="CPU inference layout"):
        ac.compile(base, ac.LoRA(r=4, targets=ATTN), lowering="eager")


# -- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,spec,match", [
    ("nf4", lambda: ac.LoHa(r=4, targets=ATTN), r"LoHa over a bitsandbytes nf4 \(double quant\) layer .*packed"),
    ("nf4", lambda: ac.LoKr(r=4, targets=ATTN), r"LoKr over a bitsandbytes nf4"),
    ("nf4", lambda: ac.HRA(r=4, targets=ATTN), r"HRA over a bitsandbytes nf4"),
    ("int8", lambda: ac.HRA(r=4, targets=ATTN), r"HRA over a bitsandbytes int8 layer .*int8 codes"),
    ("torchao_int8", lambda: ac.HRA(r=4, targets=ATTN), r"HRA over a torchao int8"),
    ("nf4", lambda: ac.MiSS(r=16, bat=True, targets=ATTN), r"rebuilds the whole weight matrix"),
    ("nf4", lambda: ac.LlamaAdapter(adapter_len=4, adapter_layers=1), r"quantized base"),
])
def test_unsupported_method_is_refused_by_name(bases, scheme, spec, match):
    base = bases(scheme)
    before = model_state(base)
    with pytest.raises(AdapterError, match=match):
        ac.compile(base, spec(), lowering="eager")
    assert_same_state(before, model_state(base))


class QuantLinear(nn.Module):
    """Stands in for a GPTQ layer (auto-gptq / gptqmodel are not installed): packed buffers, no weight."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(d_in // 8, d_out, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(1, d_out // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, d_out))

    def forward(self, x):
        return x @ torch.zeros(x.shape[-1], self.scales.shape[-1])


class WQLinear_GEMM(QuantLinear):  # noqa: N801 - AWQ's class name
    pass


@pytest.mark.parametrize("cls", [QuantLinear, WQLinear_GEMM])
def test_unknown_quantized_layer_is_refused_with_its_class(cls):
    base = tiny_llama()
    base.model.layers[0].self_attn.q_proj = cls(64, 64)
    with pytest.raises(AdapterError, match=rf"{cls.__name__} is .*(GPTQ|AWQ).*Supported quantizations: "
                                           r"bitsandbytes 4-bit.*torchao int8"):
        ac.compile(base, ac.LoRA(r=4, targets=["q_proj"]), lowering="eager")


def test_unknown_torchao_tensor_is_refused():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    base = tiny_llama()
    quantize_(base.model.layers[0].self_attn.q_proj, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(AdapterError, match="dynamic int8 activation quantization is not supported"):
        ac.compile(base, ac.LoRA(r=4, targets=["q_proj"]), lowering="eager")


def test_merge_in_place_is_refused_over_quantized_layers(bases):
    m = ac.compile(bases("nf4"), ac.LoRA(r=4, targets=ATTN), lowering="eager")
    with pytest.raises(AdapterError, match="merged_module"):
        m.merge()
    assert not m.merged


# -- checkpoints --------------------------------------------------------------------------------------
def test_checkpoints_load_both_ways(bases, tmp_path):
    base = bases("nf4")
    pm = peft_twin(base, METHODS["lora"][0]())
    randomize_(pm, ("lora_",))
    pm.train()
    batch = token_batch()
    want = logits_of(pm(**batch))
    pm.save_pretrained(tmp_path / "peft")
    m = ac.compile(base, str(tmp_path / "peft"), lowering="eager")  # PEFT -> ours (no warning: not recorded)
    m.train()
    assert_close(logits_of(m(**batch)), want, rtol=1e-5)
    m.save_adapter(tmp_path / "ours")  # ours -> PEFT, over the same quantized model
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").train()
    assert_close(logits_of(back(**batch)), want, rtol=1e-5)


def test_checkpoint_from_another_quantization_loads_with_a_warning(bases, tmp_path):
    trained = ac.compile(bases("nf4"), ac.LoRA(r=4, targets=ATTN, init=False), lowering="eager")
    trained.save_adapter(tmp_path / "a")
    with pytest.warns(QuantizationMismatchWarning, match=r"bitsandbytes nf4 \(double quant\).*torchao int8"):
        m = ac.compile(bases("torchao_int8"), str(tmp_path / "a"), lowering="eager")
    for key, t in trained.adapter_state_dict().items():
        assert torch.equal(m.adapter_state_dict()[key], t)
    with pytest.warns(QuantizationMismatchWarning, match=r"nf4 .*this base is unquantized"):
        ac.compile(tiny_llama(), str(tmp_path / "a"), lowering="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationMismatchWarning)
        ac.compile(bases("nf4"), str(tmp_path / "a"), lowering="eager")  # the same quantization: silent


# -- merge and export ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nf4", "int8", "torchao_int8"])
def test_merged_module_is_dequantized(bases, scheme):
    base = bases(scheme)
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, init=False), lowering="eager")
    randomize_(m, ("lora_",))
    m.eval()
    batch = token_batch()
    with torch.no_grad():
        want = logits_of(m(**batch))
        merged = m.merged_module().eval()
        got = logits_of(merged(**batch))
    assert all(type(mod) is nn.Linear for mod in merged.modules() if isinstance(mod, nn.Linear))
    assert not hasattr(merged.config, "quantization_config")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert_close(got, want, rtol=1e-4)


def test_requantized_merge_equals_peft_merge_and_unload(bases):
    base = bases("nf4")
    pm, m = peft_pair(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN), ac.LoRA(r=4, alpha=8, targets=ATTN),
                      keys=("lora_",))
    with pytest.warns(UserWarning, match=r"requantize=True.*rounds away"):
        ours = m.merged_module(requantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pm.merge_and_unload()
    for fqn in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        a, b = ours.get_submodule(fqn), theirs.get_submodule(fqn)
        assert type(a) is type(b) is bnb.nn.Linear4bit
        assert torch.equal(a.weight.data, b.weight.data), f"{fqn}: packed weights differ from PEFT's"
        qa, qb = a.weight.quant_state, b.weight.quant_state
        assert torch.equal(qa.absmax, qb.absmax) and torch.equal(qa.state2.absmax, qb.state2.absmax)
    errors = ours.ac_requantization_error
    assert set(errors) == {f for f in m.table.quant if f.rsplit(".", 1)[-1] in ATTN}
    assert all(e > 0 for e in errors.values())


def test_unmerged_torchao_export_runs_and_packages(bases, tmp_path):
    """An unmerged adapter over a torchao int8 base: the exported program runs our op; the
    AOTInductor package (the op in its pure-ATen form) runs without adapt_compiler."""
    from test_export import _run_package

    base = bases("torchao_int8")
    m = ac.compile(base, ac.LoRA(r=4, targets=ATTN, init=False), lowering="eager")
    m.eval()
    batches = [{"input_ids": token_batch(2, 7)["input_ids"]}, {"input_ids": token_batch(3, 5, seed=2)["input_ids"]}]
    with torch.no_grad():
        wants = [logits_of(m(**b)) for b in batches]
    ep = ac.export(m, kwargs=batches[0], merge=False)
    assert any("ao_int8_linear" in str(n.target) for n in ep.graph.nodes)
    for b, want in zip(batches, wants):
        assert_close(logits_of(ep.module()(**b)), want, rtol=1e-5)
    path = ac.package(ep, tmp_path / "q.pt2")
    report = _run_package(path, tmp_path, batches)  # a fresh process that imports no adapt_compiler
    for outs, want in zip(report["before"], wants):
        assert_close(outs[0], want, rtol=1e-4, atol=1e-5)


def test_bitsandbytes_package_is_a_clear_error(bases, tmp_path):
    m = ac.compile(bases("nf4"), ac.LoRA(r=4, targets=ATTN), lowering="eager")
    batch = {"input_ids": token_batch()["input_ids"]}
    ep = ac.export(m, kwargs=batch, merge=False)
    with torch.no_grad():
        m.eval()
        assert_close(logits_of(ep.module()(**batch)), logits_of(m(**batch)), rtol=1e-5)
    with pytest.raises(ExportError, match="bitsandbytes 4-bit .*AOTInductor cannot compile"):
        ac.package(ep, tmp_path / "q.pt2")
    assert not (tmp_path / "q.pt2").exists()


# -- the README ---------------------------------------------------------------------------------------
def test_readme_qlora_quick_start(tmp_path, monkeypatch):
    """The README's QLoRA quick start runs as written (eager lowering here, for speed)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Quantized base models (QLoRA)", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert "ac.compile(model, ac.LoRA(" in code
    code = code.replace('"o_proj"]))', '"o_proj"]), lowering="eager")')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README QLoRA quick start", "exec"), scope)  # noqa: S102 - our own docs
    assert (tmp_path / "qlora_adapter" / "adapter_config.json").is_file()
    assert type(scope["full"].model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(scope["q4"].model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    assert any("rounds away" in str(w.message) for w in caught)
    assert scope["loss"].item() == scope["loss"].item()  # trained: finite
