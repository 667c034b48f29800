"""Smoke tests: every script in examples/ runs, with tiny settings and eager lowering."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_smoke_test():
    scripts = {p.stem for p in EXAMPLES.glob("*.py")}
    covered = {"bert_classifier_lora", "causal_lm_named_adapters", "conv_lokr_loha", "peft_adapter_merge_deploy",
               "generate_runner"}
    assert scripts == covered, f"add a smoke test for {sorted(scripts - covered)}"
    for name in scripts:
        assert "def main(" in (EXAMPLES / f"{name}.py").read_text()


def test_bert_classifier_lora():
    out = _load("bert_classifier_lora").main(steps=3, quiet=True, lowering="eager")
    assert out["reloaded_same"]
    assert 0.0 <= out["accuracy_after"] <= 1.0 and out["loss"] == out["loss"]  # finite


def test_causal_lm_named_adapters_and_mixed_batch():
    example = _load("causal_lm_named_adapters")
    out = example.main(steps=2, quiet=True, lowering="eager")
    assert {"acc_plus1_on_plus1", "acc_plus2_on_plus2", "loss_plus1", "loss_plus2"} <= set(out)
    assert example.mixed_batch_available(), "mixed-adapter batches (adapt_compiler/lowering/mixed.py) are missing"
    assert out["mixed_max_abs_diff"] is not None and out["mixed_max_abs_diff"] < 1e-4


def test_conv_lokr_loha():
    example = _load("conv_lokr_loha")
    missing = example.methods_available()
    assert not missing, f"methods {missing} are not registered (passes/lokr.py, passes/loha.py)"
    out = example.main(steps=3, quiet=True, lowering="eager")
    assert out["lokr"]["mse_before"] == pytest.approx(out["loha"]["mse_before"])  # both start at the base
    for name in ("lokr", "loha"):
        assert out[name]["merge_error"] < 1e-4
    assert out["merged_module_error"] < 1e-4


def test_peft_adapter_merge_deploy_export_only():
    example = _load("peft_adapter_merge_deploy")
    assert example.export_available(), "ac.export (adapt_compiler/export.py) is missing"
    # the AOTInductor package step compiles C++ for minutes; the smoke test stops after torch.export
    out = example.main(steps=1, quiet=True, lowering="eager", package=False)
    assert out["vs_peft"] < 1e-4 and out["merged_module"] < 1e-4 and out["exported"] < 1e-4
    assert "package" not in out


def test_generate_runner_loop():
    """The runner's greedy loop over the exported programs (eager here) gives m.generate's tokens; the AOTInductor
    package itself, run in a fresh process, is tests/test_generate_export.py (slow)."""
    import torch

    import adapt_compiler as ac
    from models import tiny_llama

    runner = _load("generate_runner")
    m = ac.compile(tiny_llama(layers=1), ac.LoRA(r=2, targets=["q_proj", "v_proj"]), lowering="eager").eval()
    ids = torch.tensor([[5, 7, 9, 11], [3, 4, 6, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    progs = ac.export(m, kwargs={"input_ids": ids, "attention_mask": mask}, generate=True, max_cache_len=16)
    ours = runner.generate(progs.prefill.module(), progs.decode.module(), progs.metadata, ids, mask, max_new_tokens=4)
    with torch.no_grad():
        ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=True,
                         cache_implementation="static", pad_token_id=0)
    assert torch.equal(ours, ref)


def test_readme_quick_start(tmp_path, monkeypatch, capsys):
    """The quick start in README.md is copy-paste correct (Python block and shell command)."""
    import re
    import shlex

    from adapt_compiler import cli

    text = (EXAMPLES.parent / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", quick, re.S)[0]
    shell = re.findall(r"```bash\n(.*?)```", quick, re.S)[0].strip()
    assert "ac.compile(model, spec)" in code
    code = code.replace("ac.compile(model, spec)", 'ac.compile(model, spec, lowering="eager")')  # fast here
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README quick start", "exec"), scope)  # noqa: S102 - our own docs
    assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()
    assert type(scope["deployable"]).__name__ == "LlamaForCausalLM"
    argv = shlex.split(shell)
    assert argv[0] == "adapt-compiler"
    assert cli.main(argv[1:] + ["--quiet"]) == 0
    assert "model.layers.1.self_attn.v_proj" in capsys.readouterr().out


def test_readme_training_section(tmp_path, monkeypatch):
    """The "Training with Trainer / TRL" code in README.md runs as written (tiny offline model,
    tokenizer and datasets; eager lowering), and its claims hold: PEFT's files, loadable back."""
    import re

    from hf_data import lm_dataset, text_dataset, tiny_lm, tokenizer

    text = (EXAMPLES.parent / "README.md").read_text()
    section = text.split("## Training with Trainer / TRL", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope = {"model": tiny_lm(), "tokenizer": tokenizer(), "dataset": lm_dataset(8), "text_dataset": text_dataset(8)}
    for i, code in enumerate(blocks):
        assert "ac.compile(model, " in code
        code = re.sub(r"ac\.compile\(model, (.*)\)\n", r'ac.compile(model, \1, lowering="eager")\n', code)
        code = code.replace('report_to="none")', 'report_to="none", use_cpu=True)')  # this machine has no GPU
        exec(compile(code, f"README training block {i}", "exec"), scope)  # noqa: S102 - our own docs
    assert (tmp_path / "out" / "adapter_config.json").is_file() and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert scope["again"].adapter_parameters() and scope["sft"].state.global_step == 3


@pytest.mark.slow  # ~80 s on 2 shared cores: quick start + generate (dynamic, static, mixed) + export + CLI
def test_readme_generate_and_serve(tmp_path, monkeypatch, capsys):
    """The "Generate and serve" section runs after the quick start (its Python block, and the CLI line)."""
    import re
    import shlex

    import torch

    from adapt_compiler import cli

    text = (EXAMPLES.parent / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    section = text.split("## Generate and serve", 1)[1].split("\n## ", 1)[0]
    setup = re.findall(r"```python\n(.*?)```", quick, re.S)[0].replace("ac.compile(model, spec)",
                                                                       'ac.compile(model, spec, lowering="eager")')
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    shell = re.findall(r"```bash\n(.*?)```", section, re.S)[0].strip().splitlines()
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(setup, "README quick start", "exec"), scope)  # noqa: S102 - our own docs
    exec(compile(code, "README generate", "exec"), scope)  # noqa: S102
    m, prompt = scope["m"], scope["prompt"]
    assert scope["out"].shape == (2, 8 + 16) and scope["mixed"].shape == (2, 8 + 16)
    with torch.no_grad():
        base_row = m.generate(input_ids=prompt[1:], max_new_tokens=16, do_sample=False, adapter_names=["__base__"])
    assert torch.equal(scope["mixed"][1], base_row[0])
    assert type(scope["progs"]).__name__ == "GenerationPrograms"
    argv = shlex.split(shell[0])
    assert argv[:2] == ["adapt-compiler", "generate"]
    assert cli.main(argv[1:] + ["--lowering", "eager"]) == 0
    assert "tokens/s" in capsys.readouterr().out
