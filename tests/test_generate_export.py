"""Deploying generation: `ac.export(m, ..., generate=True)` -> prefill + decode programs over a static
cache, `ac.package` -> one AOTInductor .pt2, driven by examples/generate_runner.py (torch only).

Every token is compared with `m.generate(cache_implementation="static")` (itself equal to PEFT's
generate, test_generate.py), on a left-padded batch and on a second prompt length. The packaged
tests compile two AOTInductor models (~90 s on 2 CPU cores together) and are marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

import adapt_compiler as ac
from adapt_compiler.errors import AdapterError, ExportError
from models import tiny_llama, tiny_t5
from oracle import ours_from_peft, peft_twin, randomize_
from test_generate import ATTN, prompts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import generate_runner  # noqa: E402 - the shipped example, imported from examples/

CACHE_LEN = 32
NEW = 8
STATIC = dict(max_new_tokens=NEW, do_sample=False, use_cache=True, cache_implementation="static", pad_token_id=0)


def _adapted(base, seed):
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN))
    randomize_(pm, ("lora_",), seed=seed, scale=0.4)
    return ours_from_peft(base, pm, ac.LoRA(r=4, alpha=8, targets=ATTN), lowering="eager").eval()


@pytest.fixture(scope="module")
def adapted():
    base = tiny_llama(layers=1)
    return _adapted(base, seed=1), _adapted(base, seed=2)


@pytest.fixture(scope="module")
def programs(adapted):
    m, _ = adapted
    return ac.export(m, kwargs=prompts(), generate=True, max_cache_len=CACHE_LEN)


def _reference(m, inputs) -> torch.Tensor:
    with torch.no_grad():
        return m.generate(**inputs, **STATIC)


def test_exported_programs_generate_the_same_tokens(adapted, programs):
    m, _ = adapted
    assert isinstance(programs, ac.GenerationPrograms)
    meta = programs.metadata
    assert meta["batch"] == 2 and meta["max_cache_len"] == CACHE_LEN and meta["unmerged"]
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    # the decode program has static shapes: one token per row, the whole cache
    decode_ids = [n for n in programs.decode.graph.nodes if n.op == "placeholder" and n.name.endswith("input_ids")]
    assert [int(s) for s in decode_ids[0].meta["val"].shape] == [2, 1]
    prefill, decode = programs.prefill.module(), programs.decode.module()
    for inputs in (prompts(), prompts(length=9, seed=3)):  # left-padded; a new prompt length reuses both
        ours = generate_runner.generate(prefill, decode, meta, inputs["input_ids"], inputs["attention_mask"],
                                        max_new_tokens=NEW)
        ref = _reference(m, inputs)
        assert torch.equal(ours, ref), f"prompt {tuple(inputs['input_ids'].shape)}: {ours} vs {ref}"


def test_merged_programs_generate_the_same_tokens(adapted):
    m, _ = adapted
    merged = ac.export(m, kwargs=prompts(), generate=True, max_cache_len=CACHE_LEN, merge=True)
    assert not merged.metadata["unmerged"]
    names = [*merged.decode.state_dict, *merged.decode.constants]
    assert not any(n.startswith("ac_") for n in names), "merge=True folds the adapter into the weights"
    inputs = prompts()
    ours = generate_runner.generate(merged.prefill.module(), merged.decode.module(), merged.metadata,
                                    inputs["input_ids"], inputs["attention_mask"], max_new_tokens=NEW)
    assert torch.equal(ours, _reference(m, inputs))


def test_bad_generation_export_input_is_refused(adapted):
    m, _ = adapted
    ids = prompts()["input_ids"]
    with pytest.raises(ExportError, match="input_ids"):
        ac.export(m, generate=True)
    with pytest.raises(ExportError, match="token_type_ids"):
        ac.export(m, kwargs={"input_ids": ids, "token_type_ids": ids}, generate=True)
    with pytest.raises(ExportError, match="max_cache_len=4"):
        ac.export(m, kwargs={"input_ids": ids}, generate=True, max_cache_len=4)
    with pytest.raises(ExportError, match="max_cache_len"):
        ac.export(m, kwargs={"input_ids": ids}, max_cache_len=64)
    t5 = ac.compile(tiny_t5(), ac.LoRA(r=2, targets=["q", "v"]), lowering="eager")
    with pytest.raises(AdapterError, match="encoder-decoder"):
        ac.export(t5, kwargs={"input_ids": ids}, generate=True)


# -- the AOTInductor package, run in a fresh process without adapt_compiler -------------------------
DRIVER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import generate_runner as gr
job = torch.load(sys.argv[3], weights_only=True)
prefill, decode, meta = gr.load(sys.argv[2])
run = lambda: [gr.generate(prefill, decode, meta, b["input_ids"], b["attention_mask"], max_new_tokens=job["new"])
               for b in job["inputs"]]
out = {"before": run()}
gr.swap_adapter((prefill, decode), job["swap"])
out["after"] = run()
out["imported"] = sorted(m for m in ("adapt_compiler", "transformers", "peft") if m in sys.modules)
torch.save(out, sys.argv[4])
"""


def _fresh_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def package(programs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen_package")
    return ac.package(programs, tmp / "gen.pt2"), tmp


@pytest.mark.slow
def test_package_generates_the_same_tokens_and_swaps_adapters(adapted, package):
    m, other = adapted
    path, tmp = package
    inputs = [prompts(), prompts(length=9, seed=3)]
    job, out = tmp / "job.pt", tmp / "out.pt"
    torch.save({"inputs": inputs, "new": NEW, "swap": ac.adapter_constants(other, "default")}, job)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT / "examples"), str(path), str(job), str(out)],
                          env=_fresh_env(), cwd=str(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = torch.load(out, weights_only=True)
    assert report["imported"] == [], f"the runner imported {report['imported']}"
    for before, after, b in zip(report["before"], report["after"], inputs):
        ref, ref_other = _reference(m, b), _reference(other, b)
        assert not torch.equal(ref, ref_other), "the two adapters must generate different tokens"
        assert torch.equal(before, ref), f"package: {before} vs {ref}"
        assert torch.equal(after, ref_other), f"package after load_constants: {after} vs {ref_other}"
    assert not list(tmp.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.slow
def test_runner_command_line_prints_tokens_and_speed(adapted, package):
    m, _ = adapted
    path, tmp = package
    prompt = [98, 17, 127, 121, 16, 66]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "generate_runner.py"), str(path),
                           "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW)],
                          env=_fresh_env(), cwd=str(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = torch.tensor([prompt, prompt])
    ref = _reference(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0, len(prompt):].tolist()
    assert f"tokens: {ref}" in proc.stdout, proc.stdout
    assert "tokens/s" in proc.stdout


# -- the `adapt-compiler generate` command ----------------------------------------------------------
def test_cli_generate_prints_peft_tokens_and_speed(tmp_path, capsys):
    from adapt_compiler import cli

    base = tiny_llama()  # what --model python:models:tiny_llama builds
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN))
    randomize_(pm, ("lora_",), seed=5, scale=0.4)
    pm.save_pretrained(tmp_path / "adapter")
    prompt = [98, 17, 127, 121, 16, 66]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **STATIC)[0, len(prompt):].tolist()
    argv = ["generate", "--model", "python:models:tiny_llama", "--adapter", str(tmp_path / "adapter"),
            "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW), "--lowering", "eager"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"tokens: {ref}" in out, out
    assert "tokens/s" in out
    assert cli.main([*argv[:-4], "--prompt-ids", "5,x"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert cli.main([*argv[:-4], "--prompt-ids", "5,999", "--lowering", "eager"]) == 2
    assert "[999]" in capsys.readouterr().err
