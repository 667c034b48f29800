"""PEFT as the numerical oracle: build the same adapter in PEFT, copy its (non-trivial) weights to ours,
and compare outputs and adapter gradients."""

from __future__ import annotations

import copy

import torch

import adapt_compiler as ac


def randomize_(module: torch.nn.Module, names: tuple[str, ...], seed: int = 0, scale: float = 0.1) -> None:
    """Give every parameter whose name contains one of `names` non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def peft_twin(model, peft_config, adapter_name: str = "default"):
    """A PeftModel over a deep copy of `model` (PEFT modifies the model it wraps; ours must not)."""
    import peft

    # PEFT's new dropout modules start in train mode; follow the base model's mode like we do
    return peft.get_peft_model(copy.deepcopy(model), peft_config, adapter_name=adapter_name).train(model.training)


def ours_from_peft(model, peft_model, spec, lowering="eager", adapter_name="default", **kw):
    """Our AdaptedModule with exactly the PEFT model's adapter weights."""
    from peft import get_peft_model_state_dict

    m = ac.compile(model, {adapter_name: spec}, lowering=lowering, **kw)
    m.load_adapter_state_dict(get_peft_model_state_dict(peft_model, adapter_name=adapter_name), adapter_name)
    return m


def logits_of(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def assert_close(a, b, rtol=1e-5, atol=1e-6, what="output"):
    a, b = a.detach().float(), b.detach().float()
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max |Δ| = {err:.3e} (scale {scale:.3e})"


def adapter_grads_peft(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's adapter gradients keyed like its saved state dict."""
    from peft.utils.save_and_load import get_peft_model_state_dict

    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    keys = get_peft_model_state_dict(peft_model)
    out = {}
    for n, p in named.items():
        for adapter in ("default",):
            n2 = n.replace(f".{adapter}.", ".").removesuffix(f".{adapter}")
            n2 = n2.replace("modules_to_save.", "")
            for cand in (n2, n2.removesuffix(".weight")):
                if cand in keys and p.grad is not None:
                    out[cand] = p.grad
                    break
    return out


def adapter_grads_ours(m, adapter_name="default") -> dict[str, torch.Tensor]:
    """Our adapter gradients keyed like our saved state dict (the live tensors behind its keys)."""
    from adapt_compiler.checkpoint import adapter_state_dict

    live = adapter_state_dict(m.table, adapter_name, live=True)
    return {k: t.grad for k, t in live.items() if t.grad is not None}


def compare_grads(m, peft_model, adapter_name="default", rtol=1e-5, atol=1e-6):
    ours, theirs = adapter_grads_ours(m, adapter_name), adapter_grads_peft(peft_model)
    assert ours, "no adapter gradients on our side"
    assert set(ours) == set(theirs), f"grad keys differ: {sorted(set(ours) ^ set(theirs))[:5]}"
    for k in ours:
        assert_close(ours[k], theirs[k], rtol=rtol, atol=atol, what=f"grad {k}")


def call_model(m, batch):
    """Token batches are dicts of keyword inputs; image batches are one positional tensor; a tuple is
    several positional inputs."""
    if isinstance(batch, dict):
        return m(**batch)
    return m(*batch) if isinstance(batch, tuple) else m(batch)


def assert_peft_checkpoint_round_trip(base, batch, peft_cfg, spec, tmp_path, keys):
    """PEFT dir -> ours gives PEFT's outputs and the same spec; ours -> PEFT keeps PEFT's key names and outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    pm = peft_twin(base, peft_cfg)
    randomize_(pm, keys)
    want = logits_of(call_model(pm, batch))
    pm.save_pretrained(tmp_path / "peft")
    m = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert m.state.specs["default"] == spec.replace(targets=m.state.specs["default"].targets)
    assert_close(logits_of(call_model(m, batch)), want, what="PEFT dir -> ours")
    m.save_adapter(tmp_path / "ours")
    theirs_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == theirs_keys
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(logits_of(call_model(pm2, batch)), want, what="ours -> PeftModel.from_pretrained")


def square_loss(out):
    return logits_of(out).square().mean()


def peft_pair(base, peft_cfg, spec, *, keys, seed=0):
    """A PEFT model with random adapter weights (the tensors whose names contain `keys`) and ours loaded from it."""
    pm = peft_twin(base, peft_cfg)
    randomize_(pm, keys, seed=seed)
    return pm, ours_from_peft(base, pm, spec)


def check_vs_peft(base, peft_cfg, spec, batch, *, keys, train=False, seed=None):
    """Outputs and adapter gradients equal PEFT's; `seed` re-seeds before each forward (dropout in train)."""
    pm, m = peft_pair(base, peft_cfg, spec, keys=keys)
    pm.train(train)
    m.train(train)
    if seed is not None:
        torch.manual_seed(seed)
    theirs = call_model(pm, batch)
    if seed is not None:
        torch.manual_seed(seed)
    ours = call_model(m, batch)
    assert_close(logits_of(ours), logits_of(theirs))
    square_loss(ours).backward()
    square_loss(theirs).backward()
    compare_grads(m, pm)
    return m, pm


def step_both_and_compare(m, pm, batch, *, loss_of=square_loss, lr=0.1):
    """A training step on both sides: adapter gradients compared, one SGD step each, then the eval outputs
    compared. Returns PEFT's output after the step."""
    pm.train()
    m.train()
    loss_of(call_model(m, batch)).backward()
    loss_of(call_model(pm, batch)).backward()
    compare_grads(m, pm)
    for params in (m.adapter_parameters(), [p for p in pm.parameters() if p.requires_grad]):
        torch.optim.SGD(params, lr=lr).step()
    pm.eval()
    m.eval()
    want = call_model(pm, batch)
    assert_close(logits_of(call_model(m, batch)), logits_of(want), what="output after a step")
    return want


def check_full_parity(base, batch, peft_cfg, spec, tmp_path, *, keys, merge=True, seed=0, loss_of=square_loss,
                      lowering="eager", peft_merge=True):
    """The whole contract against PEFT on one configuration, with non-trivial adapter weights:
    outputs and adapter gradients (a training step), one optimizer step on both sides, both checkpoint
    directions (PEFT's directory loads here and gives PEFT's outputs; ours loads into PeftModel), and,
    with `merge`, merged == unmerged here and PEFT's merge_and_unload equal to ours. Returns our module."""
    from peft import PeftModel

    pm = peft_twin(base, peft_cfg)
    randomize_(pm, keys, seed=seed)
    m = ours_from_peft(base, pm, spec, lowering=lowering)
    want = call_model(pm, batch)
    assert_close(logits_of(call_model(m, batch)), logits_of(want), what="output")
    want = step_both_and_compare(m, pm, batch, loss_of=loss_of)
    pm.save_pretrained(tmp_path / "peft")
    loaded = ac.compile(base, str(tmp_path / "peft"), lowering="eager")
    assert_close(logits_of(call_model(loaded, batch)), logits_of(want), what="PEFT dir -> ours")
    m.save_adapter(tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(logits_of(call_model(back, batch)), logits_of(want), what="ours -> PeftModel.from_pretrained")
    if merge:
        m.merge()
        assert_close(logits_of(call_model(m, batch)), logits_of(want), what="merged")
        m.unmerge()
        assert_close(logits_of(call_model(m.merged_module(), batch)), logits_of(want), what="merged_module()")
        if peft_merge:
            merged = copy.deepcopy(pm).merge_and_unload()
            assert_close(logits_of(call_model(merged, batch)), logits_of(want), what="PEFT merge_and_unload")
    return m


def train_then_save_converted(pm, m, batch, tmp_path):
    """A residual init (PiSSA, LoRA-GA, ...) on both sides: save the initial adapters (`<tmp>/peft_init`,
    `<tmp>/ours_init`), take one SGD step each, and save the trained adapters converted to plain LoRA over the
    original weights (`<tmp>/peft`, `<tmp>/ours`, save_pretrained's path_initial_model_for_weight_conversion).
    Returns our trained logits, which every converted directory must reproduce."""
    pm.save_pretrained(tmp_path / "peft_init")
    m.save_pretrained(tmp_path / "ours_init")
    for model, params in ((pm, [p for p in pm.parameters() if p.requires_grad]), (m, m.adapter_parameters())):
        model.train()
        square_loss(call_model(model, batch)).backward()
        torch.optim.SGD(params, lr=0.5).step()
        model.eval()
    want = logits_of(call_model(m, batch))
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    m.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init"))
    return want
