"""BOFT against PEFT 0.21.2: outputs and adapter gradients, butterfly permutations, merge, checkpoints.

PEFT runs N > 1 butterfly factors only through its CUDA extension (on CPU it silently uses N = 1), so
the PEFT twin gets a CPU stand-in for `fbd_cuda` (block-diag forward, block-extract backward).
"""

import copy
from functools import partial
import json

import peft
import pytest
import torch
from peft.tuners.boft import layer as boft_layer

import adapt_compiler as ac
from models import image_batch, tiny_convnet, tiny_llama, token_batch
from oracle import (assert_close, call_model, check_vs_peft, logits_of, ours_from_peft,
                    peft_pair, peft_twin, randomize_)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONVS = ["conv1", "conv2", "down", "proj"]


class _CpuFbd:
    """Stand-in for PEFT's fbd_cuda extension: (N, D, b, b) <-> (N, D·b, D·b)."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*f) for f in x])]

    @staticmethod
    def backward(grad, x):
        n, d, b, _ = x.shape
        return [torch.stack([torch.stack([grad[i, j * b:(j + 1) * b, j * b:(j + 1) * b] for j in range(d)])
                             for i in range(n)])]


@pytest.fixture(autouse=True)
def _fbd_stub(monkeypatch):
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _CpuFbd)


KEYS = ("boft_",)


_pair = partial(peft_pair, keys=KEYS)
_check_vs_peft = partial(check_vs_peft, keys=KEYS)


OPTIONS = {
    "n1": dict(boft_block_size=8, boft_n_butterfly_factor=1),
    "n2": dict(boft_block_size=8, boft_n_butterfly_factor=2),
    "n3_block_num": dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_llama_gqa_matches_peft(option):
    kw = OPTIONS[option]
    _check_vs_peft(tiny_llama(), peft.BOFTConfig(target_modules=ATTN, **kw), ac.BOFT(targets=ATTN, **kw),
                   token_batch())


def test_dropout_in_training_matches_peft():
    """Same RNG calls in the same order as PEFT's MultiplicativeDropoutLayer: same blocks dropped."""
    kw = dict(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5)
    _check_vs_peft(tiny_llama(), peft.BOFTConfig(target_modules=ATTN, **kw), ac.BOFT(targets=ATTN, **kw),
                   token_batch(), train=True, seed=11)


@pytest.mark.parametrize("option", ["n1", "n2"])
def test_conv_net_matches_peft(option):
    """PEFT's BOFT Conv2d rotates the weight (correct for any kernel): compare every conv."""
    kw = dict(OPTIONS[option], boft_block_size=4)
    _check_vs_peft(tiny_convnet(), peft.BOFTConfig(target_modules=CONVS, **kw), ac.BOFT(targets=CONVS, **kw),
                   image_batch())


def test_butterfly_permutations_are_peft_views():
    from adapt_compiler.passes.boft import _shuffle, _unshuffle, butterfly_perm

    for n, d, b, nf in [(16, 8, 2, 3), (64, 8, 8, 2), (64, 16, 4, 3), (72, 18, 4, 2)]:
        for i in range(nf):
            ref = boft_layer.BOFTLayer.block_butterfly_perm(None, n, int(d / 2**i), b // 2, nf - 1)
            assert torch.equal(butterfly_perm(n, int(d / 2**i), b // 2, nf - 1), ref)
            x = torch.randn(3, n)
            assert torch.equal(_shuffle(x, i, b), x[:, ref])  # x·Pᵀ
            assert torch.equal(_unshuffle(_shuffle(x, i, b), i, b), x)


def test_identity_at_init():
    for base, spec, batch in [
        (tiny_llama(), ac.BOFT(targets=ATTN, boft_block_size=8, boft_n_butterfly_factor=2), token_batch()),
        (tiny_convnet(), ac.BOFT(targets=CONVS, boft_block_size=4, boft_n_butterfly_factor=2), image_batch()),
    ]:
        m = ac.compile(base, spec, lowering="eager")
        with torch.no_grad():
            assert_close(logits_of(call_model(m, batch)), logits_of(call_model(base, batch)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_orders_agree_per_layer(kind):
    from adapt_compiler.passes.method import Layer
    from test_oft import _method_orders_agree

    method, spec = ac.METHODS["boft"], ac.BOFT(boft_block_size=4, boft_n_butterfly_factor=3)
    if kind == "linear":
        layer, x = Layer("lin", "linear", (24, 64), True, torch.float32), torch.randn(3, 5, 64)
    else:
        k = 1 if kind == "conv1x1" else 3
        layer = Layer("conv", "conv2d", (6, 16, k, k), True, torch.float32, stride=(2, 1), padding=(1, 0))
        x = torch.randn(2, 16, 9, 11)
    params = method.init_params(spec.replace(init_weights=False), layer, torch.empty(layer.weight_shape))
    _method_orders_agree(method, spec, layer, params, x)


def test_both_orders_agree_on_model():
    base = tiny_llama()
    pm = peft_twin(base, peft.BOFTConfig(target_modules=ATTN, **OPTIONS["n2"]))
    randomize_(pm, ("boft_",))
    outs = []
    for order in ("activation", "weight"):
        m = ours_from_peft(base, pm, ac.BOFT(targets=ATTN, order=order, **OPTIONS["n2"]))
        outs.append(m(**token_batch()).logits)
        assert {d.order for (f, _), d in m.decisions().items() if f == "model.layers.1.self_attn.o_proj"} == {order}
    assert_close(outs[0], outs[1])


def test_merge_exact_and_unmerge_bit_exact():
    base = tiny_convnet()
    kw = dict(boft_block_size=4, boft_n_butterfly_factor=2)
    pm, m = _pair(base, peft.BOFTConfig(target_modules=CONVS, **kw), ac.BOFT(targets=CONVS, **kw))
    x = image_batch()
    before = {k: v.clone() for k, v in m.table.frozen.items()}
    ref = m(x)
    m.merge()
    assert_close(m(x), ref)
    pm.merge_adapter()
    assert_close(m(x), pm(x))
    m.unmerge()
    assert all(torch.equal(before[k], m.table.frozen[k]) for k in before)


def test_checkpoint_round_trips(tmp_path):
    base = tiny_llama()
    kw = OPTIONS["n2"]
    pm = peft_twin(base, peft.BOFTConfig(target_modules=ATTN, **kw))
    randomize_(pm, ("boft_",))
    batch = token_batch()
    pm.save_pretrained(tmp_path / "peft")
    m = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert_close(m(**batch).logits, pm(**batch).logits)
    m.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(back(**batch).logits, pm(**batch).logits)


def test_cpu_peft_checkpoint_trusts_tensor_shapes(tmp_path):
    """PEFT without fbd_cuda trains N=1 but saves the configured N: the tensors' shapes win."""
    base = tiny_llama()
    pm = peft_twin(base, peft.BOFTConfig(target_modules=ATTN, boft_block_size=8, boft_n_butterfly_factor=1))
    randomize_(pm, ("boft_",))
    pm.save_pretrained(tmp_path)
    cfg_file = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["boft_n_butterfly_factor"] = 3  # what PEFT on CPU writes for a requested N=3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="using 1"):
        m = ac.compile(base, str(tmp_path), lowering="eager")
    assert m.state.specs["default"].boft_n_butterfly_factor == 1
    assert_close(m(**token_batch()).logits, pm(**token_batch()).logits)


def test_block_errors_name_layer_and_sizes():
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ac.AdapterShapeError, match=r"q_proj.*boft_block_size=6.*d_in=64.*valid.*\b8\b"):
        ac.compile(base, ac.BOFT(targets=ATTN, boft_block_size=6))
    with pytest.raises(ac.AdapterShapeError, match=r"boft_n_butterfly_factor=4.*valid boft_block_size values: .*\b4\b"):
        ac.compile(base, ac.BOFT(targets=ATTN, boft_block_size=16, boft_n_butterfly_factor=4))
    with pytest.raises(ac.AdapterShapeError, match=r"conv_in.*d_in·kh·kw=27"):
        ac.compile(tiny_convnet(), ac.BOFT(targets=["conv_in"], boft_block_size=4))
    with pytest.raises(ac.AdapterError, match="exactly one"):
        ac.BOFT(boft_block_size=4, boft_block_num=4)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())



def test_dropout_mask_compiles_with_inductor_and_draws_peft_masks():
    """Regression (issue 20): the mask was built as `mask[torch.randperm(D)]`, which Inductor failed to
    compile (BackendCompilerFailed ... slice_shape), so training with boft_dropout under the default
    lowering crashed. The mask op as the default lowering compiles it (fallback_random, fullgraph,
    with its backward) now gives PEFT's MultiplicativeDropoutLayer output for the same seed."""
    import torch._inductor.config as inductor_config

    from adapt_compiler.passes.boft import BOFTMethod

    q = torch.randn(3, 8, 4, 4, requires_grad=True)
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(BOFTMethod._dropout, backend="inductor", fullgraph=True)
        torch.manual_seed(3)
        ours = compiled(q, 0.5)
        ours.square().sum().backward()
    torch.manual_seed(3)
    theirs = boft_layer.MultiplicativeDropoutLayer(0.5).train()(q)
    assert torch.equal(ours, theirs)
    assert int((ours == q).all(dim=(-1, -2)).sum()) == 3 * 8 - 4  # int(0.5·8) blocks of one factor -> I
    assert q.grad is not None
