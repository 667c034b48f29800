"""A hand-written accelerate loop trains an AdaptedModule as it trains a PeftModel (integrations/).

Accelerator.prepare / backward / unwrap_model / save_state / load_state on a tiny Llama, PEFT with the
same adapter weights and data as the oracle. Eager lowering.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapt_compiler as ac
from fresh_process import compile_env
from hf_data import lm_dataset, tiny_lm
from oracle import ours_from_peft, peft_twin, randomize_

TESTS = Path(__file__).parent

peft = pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")
TARGETS = ["q_proj", "v_proj"]


def _loop(acc, module, params, batch, steps=3):
    opt = torch.optim.AdamW(params, lr=1e-2)
    module, opt = acc.prepare(module, opt)
    losses = []
    for _ in range(steps):
        loss = module(**batch).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return module, losses


# A fresh process: in two full runs (4b7a683 and 72cc6a0, 2 workers) this test failed on step 1, the loss before
# any update, and it never failed alone. In 72cc6a0's run ours read 3.6034448 and PEFT 3.6033530, while alone both
# read 3.6035628 (to every digit printed). Both sides had moved, so something an earlier test left in the worker changed
# the model's or the data's computation; it is not found yet. A fresh process keeps this comparison to what
# accelerate and our module do.
def test_accelerate_loop_matches_peft_and_state_round_trips(tmp_path):
    env = compile_env(tmp_path / "inductor", [TESTS, *filter(None, [os.environ.get("PYTHONPATH")])],
                      threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", f"import test_accelerate as t; t._loop_matches_peft({str(tmp_path)!r})"],
                          env=env, cwd=TESTS, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _loop_matches_peft(tmp: str):
    tmp_path = Path(tmp)
    base = tiny_lm()
    base.config.use_cache = False  # a training forward with the cache on returns a DynamicCache (see README)
    pm = peft_twin(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_(pm, ("lora_",))
    m = ours_from_peft(base, pm, ac.LoRA(r=4, alpha=8, targets=TARGETS)).train()
    pm.train()
    batch = {k: torch.tensor(v) for k, v in lm_dataset(4)[:].items()}
    acc = accelerate.Accelerator(cpu=True)
    prepared, ours = _loop(acc, m, m.adapter_parameters(), batch)
    assert acc.unwrap_model(prepared) is m
    _, theirs = _loop(accelerate.Accelerator(cpu=True), pm, [p for p in pm.parameters() if p.requires_grad], batch)
    assert ours[-1] < ours[0]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {i + 1}: {a} vs PEFT {b}"
    acc.save_state(str(tmp_path / "state"))
    saved = [p.detach().clone() for p in m.adapter_parameters()]
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.add_(1.0)
    acc.load_state(str(tmp_path / "state"))
    assert all(torch.equal(a, b) for a, b in zip(saved, m.adapter_parameters()))
