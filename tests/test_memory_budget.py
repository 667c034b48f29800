"""ac.compile(..., memory_budget=b) under the default Inductor lowering lowers what a training step
keeps for the backward, monotonically in b, and leaves the numbers unchanged.

Measured in a fresh process (nothing compiled or cached by other tests in it): after a warmup step
(capture, compile: AOTAutograd's partitioner reads the budget here, the guard's first call), one
step runs under torch.autograd.graph.saved_tensors_hooks, which sees every tensor the compiled
forward saves for the backward (ctx.save_for_backward); the bytes of their distinct storages are
the step's saved activations, whatever the allocator does. benchmarks/memory_budget.py measures
the process's peak RSS at the issue's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fresh_process import compile_env

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (1.0, 0.5, 0.1)

DRIVER = r"""
import json, sys
import torch
import adapt_compiler as ac
from adapt_compiler.lowering.recompute import recomputed_blocks
from models import tiny_llama, token_batch

rows = {}
for run in json.loads(sys.argv[1]):
    budget = None if run == "ckpt" else float(run)
    m = ac.compile(tiny_llama(layers=2, vocab=32), ac.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]),
                   memory_budget=budget).train()
    if run == "ckpt":
        m.gradient_checkpointing_enable()
    for p in m.adapter_parameters():  # non-zero adapters, so every adapter gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    batch = token_batch(batch=2, seq=128, vocab=32, labels=True)
    m(**batch).loss.backward()  # capture, compile, the guard's first call
    m.zero_grad(set_to_none=True)
    storages, shapes = {}, []

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        shapes.append(list(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(**batch).loss
    loss.backward()
    rows[run] = {"saved_bytes": sum(storages.values()), "shapes": shapes, "loss": loss.item(),
                 "grads": [p.grad.flatten().tolist() for p in m.adapter_parameters()],
                 "blocks": recomputed_blocks(m.latest_graph())}
print("ROWS " + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One fresh process: a training step at each budget, and one with gradient checkpointing."""
    env = compile_env(tmp_path_factory.mktemp("inductor_cache"), [ROOT, ROOT / "tests"])
    runs = [str(b) for b in BUDGETS] + ["ckpt"]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS "))
    return {(k if k == "ckpt" else float(k)): v for k, v in json.loads(line[5:]).items()}


def _same_numbers(row, ref, what):
    assert abs(row["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (what, row["loss"], ref["loss"])
    for g, r in zip(row["grads"], ref["grads"]):
        worst = max(abs(x - y) for x, y in zip(g, r))
        scale = max(abs(y) for y in r)
        assert scale > 0 and worst <= 1e-4 * scale + 1e-7, f"{what}: adapter grad off by {worst} (scale {scale})"


@pytest.mark.slow  # ~4 min on 2 shared cores (the fixture): four Inductor compiles of a training graph
def test_memory_budget_lowers_saved_activations_monotonically_under_inductor(rows):
    saved = [rows[b]["saved_bytes"] for b in BUDGETS]
    assert saved[0] > saved[1] > saved[2] > 0, f"saved-for-backward bytes at budgets {BUDGETS}: {saved}"
    assert saved[2] <= 0.5 * saved[0], f"budget 0.1 should keep at most half of the unlimited step's: {saved}"
    for b in BUDGETS:  # AOTAutograd's partitioner decided, not our block checkpointing
        assert rows[b]["blocks"] == [], rows[b]["blocks"]
    for b in BUDGETS[1:]:  # recomputing changes what is kept, not the numbers
        _same_numbers(rows[b], rows[1.0], f"budget {b}")


@pytest.mark.slow  # shares the fixture above
def test_checkpointed_step_under_inductor_keeps_block_inputs_not_the_attention_mask(rows):
    """With gradient checkpointing, the compiled step keeps each layer's input, not the [batch, 1,
    seq, seq] attention mask: without lowering._with_memory_budget's `checkpointed` setting,
    AOTAutograd's CSE merges the layers' identical float masks and the partitioner keeps that one."""
    ckpt = rows["ckpt"]
    assert ckpt["blocks"] == ["model.layers.0", "model.layers.1"]
    assert [2, 1, 128, 128] not in ckpt["shapes"], "the float attention mask is kept for the backward"
    assert ckpt["saved_bytes"] < 0.5 * rows[1.0]["saved_bytes"], (ckpt["saved_bytes"], rows[1.0]["saved_bytes"])
    _same_numbers(ckpt, rows[1.0], "checkpointed")
