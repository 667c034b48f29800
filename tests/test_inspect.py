"""`adapt-compiler inspect`, `m.report()`, the graph pictures, progress display and the debug env var."""

from __future__ import annotations

import re

import pytest
import torch

import adapt_compiler as ac
from adapt_compiler import cli, graph_view, progress
from adapt_compiler.commands.inspect import example_inputs, load_model, parse_spec
from adapt_compiler.lowering.plan import choose_order, slot_nodes
from adapt_compiler.passes.match import describe_layer
from models import tiny_bert, tiny_llama, token_batch


def _lora_params(model, targets, r):
    """What LoRA adds, counted from the model itself: r·(d_in + d_out) per targeted Linear/Conv1D."""
    total = 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] in targets:
            d0, d1 = mod.weight.shape
            total += r * (d0 + d1)
    return total


def _inspect(capsys, *argv) -> str:
    code = cli.main(["inspect", *argv, "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def _trainable(out: str) -> tuple[int, float, int]:
    m = re.search(r"trainable params: ([\d,]+) \(([\d.]+)% of ([\d,]+) base params\)", out)
    assert m, out
    return int(m.group(1).replace(",", "")), float(m.group(2)), int(m.group(3).replace(",", ""))


def test_inspect_llama_from_config_json_with_pictures(tmp_path, capsys):
    """Llama from a HF config.json: table, totals, unmatched layers, the PNG and the DOT file."""
    cfg = tmp_path / "config.json"
    tiny_llama().config.to_json_file(cfg)
    png, dot = tmp_path / "q.png", tmp_path / "graph.dot"
    out = _inspect(capsys, "--model", str(cfg), "--spec", 'LoRA(r=4, targets=["q_proj", "v_proj"])',
                   "--unmatched", "--graph", "layers.1.self_attn.q_proj", "--out", str(png), "--dot", str(dot))
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        assert layer in out
    assert "activation" in out and "weight" in out and "@T=16" in out  # both orders' FLOPs at 2×8 tokens
    model = load_model(str(cfg))
    expected = _lora_params(model, {"q_proj", "v_proj"}, 4)
    base = sum(p.numel() for p in model.parameters())
    trainable, percent, base_seen = _trainable(out)
    assert (trainable, base_seen) == (expected, base)
    assert percent == pytest.approx(100 * expected / base, abs=1e-3)
    assert f"{expected:,}" in out.split("total", 1)[1]  # the table's footer sums the params column
    # --unmatched: k/o/mlp projections are Linear too, but not in targets
    assert "close but not targeted" in out and "model.layers.*.self_attn.k_proj" in out and "not in targets" in out
    # the PNG: a real image of some size
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "model.layers.1.self_attn.q_proj" in out.split("wrote", 1)[1]
    # the DOT: the whole graph, adapter layers traced open into clusters
    text = dot.read_text()
    assert text.startswith("digraph") and text.rstrip().endswith("}")
    assert text.count("->") > 100 and text.count("subgraph cluster_") == 4
    assert "lora_A" in text and "lora_B" in text


def test_inspect_gpt2_builtin_conv1d(capsys):
    out = _inspect(capsys, "--model", "gpt2", "--spec", 'LoRA(r=2, targets=["c_attn", "c_proj"])')
    model = load_model("gpt2")
    trainable, _, base = _trainable(out)
    assert trainable == _lora_params(model, {"c_attn", "c_proj"}, 2)
    assert base == sum(p.numel() for p in model.parameters())
    assert "transformer.h.1.mlp.c_proj" in out and "transformer.h.0.attn.c_attn" in out


def test_inspect_bert_python_factory_modules_to_save(capsys):
    spec = 'LoRA(r=2, targets=["query", "value"], modules_to_save=["classifier"])'
    out = _inspect(capsys, "--model", "python:models:tiny_bert", "--spec", spec)
    model = tiny_bert()
    head = sum(p.numel() for p in model.classifier.parameters())
    trainable, _, _ = _trainable(out)
    assert trainable == _lora_params(model, {"query", "value"}, 2) + head
    assert "modules_to_save" in out and "classifier" in out


def test_inspect_peft_directory(tmp_path, capsys):
    import peft

    base = tiny_llama()
    cfg = tmp_path / "base"
    base.config.save_pretrained(cfg)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    out = _inspect(capsys, "--model", str(cfg), "--adapter", str(tmp_path / "adapter"))
    trainable, _, _ = _trainable(out)
    assert trainable == _lora_params(tiny_llama(), {"q_proj", "o_proj"}, 2)
    assert "model.layers.1.self_attn.o_proj" in out


def test_report_totals_match_parameter_counts_and_keep_str():
    model = tiny_bert()
    spec = ac.LoRA(r=2, targets=["query", "value"], modules_to_save=["classifier"])
    m = ac.compile(model, spec, lowering="eager")
    rep = m.report()
    trainable = sum(p.numel() for p in m.adapter_parameters())
    assert rep.trainable_params == trainable == rep.adapter_params
    assert sum(r.params for r in rep.rows) + sum(s.params for s in rep.saved) == trainable
    assert rep.base_params == sum(p.numel() for p in model.parameters())
    assert all(r.order == "activation (not captured yet)" for r in rep.rows)  # no capture, no choice yet
    text = str(rep)
    assert "trainable params:" in text and "bert.encoder.layer.0.attention.self.query" in text
    m.capture((), token_batch())
    rep = m.report()
    assert all(r.flops and r.at_tokens == 14 for r in rep.rows)  # 2 × 7 tokens
    # the reported order is the cost model's choice for that layer at 14 tokens, computed here from the
    # method's cost() (not from the report's own numbers) ...
    modules, method = dict(model.named_modules()), ac.METHODS["lora"]
    for r in rep.rows:
        want = choose_order(method, spec, describe_layer(r.fqn, modules[r.fqn]), 14, training=m.training)
        assert r.order == want.order and r.flops == pytest.approx(want.evaluated()), (r.fqn, r.flops, want)
    # ... and what the graph runs: the plan's kwargs on the slot nodes, and m.decisions()
    reported = {r.fqn: r.order for r in rep.rows}
    assert reported == {slot.layer.fqn: node.kwargs["orders"]["default"] for node, slot in slot_nodes(m.latest_graph())}
    assert reported == {fqn: d.order for (fqn, _), d in m.decisions().items()}


@pytest.mark.parametrize("forced", ["weight", "activation"])
def test_report_shows_a_forced_order(forced):
    """spec.order overrides the cost model; the report, the decisions and the graph all say so."""
    model = tiny_bert()
    spec = ac.LoRA(r=2, targets=["query", "value"], order=forced)
    m = ac.compile(model, spec, lowering="eager", example_inputs=token_batch())
    rows = m.report().rows
    assert len(rows) == 4 and {r.order for r in rows} == {forced}
    assert {node.kwargs["orders"]["default"] for node, _ in slot_nodes(m.latest_graph())} == {forced}
    assert {d.order for d in m.decisions().values()} == {forced}
    # the forced order computes what the cost model's choice computes (with a non-zero adapter)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    auto = ac.compile(model, spec.replace(order="auto"), lowering="eager")
    auto.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(**token_batch()).logits, auto(**token_batch()).logits, rtol=1e-5, atol=1e-6)


def test_report_several_adapters_rich(capsys):
    spec = parse_spec('{"a": LoRA(r=2, targets=["q_proj"]), "b": LoRA(r=4, targets=["v_proj"])}')
    m = ac.compile(tiny_llama(), spec, lowering="eager")
    rep = m.report()
    assert rep.adapters["a"][1] == _lora_params(tiny_llama(), {"q_proj"}, 2)
    assert rep.adapters["b"][1] == _lora_params(tiny_llama(), {"v_proj"}, 4)
    assert rep.trainable_params == rep.adapters["a"][1]  # only the active adapter trains
    rep.print(unmatched=True)
    out = capsys.readouterr().out
    assert "adapter" in out and "a (lora" in out and "b (lora" in out
    assert "self_attn.v_proj" in out.split("close but not targeted")[1]  # not targeted by adapter a


def test_graph_view_colours_by_adapter_meta():
    m = ac.compile(tiny_llama(), ac.LoRA(r=2, targets=["q_proj"]), lowering="eager", example_inputs=token_batch())
    gm = graph_view.adapted_graph(m)
    tagged = {n.name for n in gm.graph.nodes if "adapter" in n.meta}
    g = graph_view.to_networkx(gm)
    assert {n for n, d in g.nodes(data=True) if d["role"] == "adapter"} == tagged
    opened = graph_view.to_networkx(gm, expand="all")
    params = [d["label"].split("\n")[0] for _, d in opened.nodes(data=True) if d["role"] == "adapter_param"]
    assert sorted(params) == ["lora_A", "lora_A", "lora_B", "lora_B"]
    assert not tagged & set(opened)  # every slot was traced open
    with pytest.raises(ac.AdapterError, match="no adapted layer matches"):
        graph_view.find_layer(gm, "k_proj")


def test_inspect_errors_are_clear(capsys, tmp_path):
    assert cli.main(["inspect", "--model", "llama", "--spec", "LoRAX(r=2)", "--quiet"]) == 2
    assert "available specs" in capsys.readouterr().err
    assert cli.main(["inspect", "--model", "nonsense", "--spec", "LoRA(r=2)", "--quiet"]) == 2
    assert "not understood" in capsys.readouterr().err
    assert cli.main(["inspect", "--model", "llama", "--spec", 'LoRA(r=2, targets=["qproj"])', "--quiet"]) == 2
    assert "q_proj" in capsys.readouterr().err  # the close name is suggested


def test_example_inputs_from_config_and_first_layer():
    _, kw = example_inputs(load_model("vit"))
    assert kw["pixel_values"].shape == (2, 3, 16, 16)
    args, _ = example_inputs(load_model("convnet"))
    assert args[0].shape == (2, 3, 16, 16)
    _, kw = example_inputs(load_model("llama"), batch=3, seq=5)
    assert kw["input_ids"].shape == (3, 5) and int(kw["input_ids"].max()) < 128


def test_debug_env_prints_graph_after_each_pass(monkeypatch, capsys):
    monkeypatch.setenv("ADAPT_COMPILER_DEBUG", "1")
    ac.compile(tiny_llama(layers=1), ac.LoRA(r=2, targets=["q_proj"]), lowering="eager", example_inputs=token_batch())
    out = capsys.readouterr().out
    assert "===== after insert_weight_adapters (adapted) =====" in out
    assert "call_module[target=ac_slots" in out and "graph():" in out
    monkeypatch.delenv("ADAPT_COMPILER_DEBUG")
    ac.compile(tiny_llama(layers=1), ac.LoRA(r=2, targets=["q_proj"]), lowering="eager", example_inputs=token_batch())
    assert "=====" not in capsys.readouterr().out


def test_progress_is_quiet_off_a_terminal(monkeypatch, capsys):
    items = [1, 2, 3]
    assert progress.progress(items, desc="x") is items  # pytest's stderr is not a TTY
    with progress.status("step"):
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "_interactive", lambda: True)
    bar = progress.progress(items, desc="x")
    assert bar is not items and list(bar) == items
    assert progress.progress(items, quiet=True) is items
    with progress.quiet():
        assert progress.progress(items) is items
        assert progress.is_quiet()
    monkeypatch.setenv("ADAPT_COMPILER_QUIET", "1")
    assert progress.progress(items) is items


def test_unmatched_lists_graph_weights_the_matcher_could_not_adapt(capsys):
    """--unmatched (issue 20): besides Linear layers left out of `targets`, the weights the graph reads
    through ops that are not linear-equivalent (Mixtral's fused experts, a grouped matmul) and linear
    ops inside modules a target cannot name (its router), each with the reason and the way out."""
    import transformers as tf

    from adapt_compiler.commands.inspect import inspect_model

    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, use_cache=False)
    torch.manual_seed(0)
    _, rep = inspect_model(tf.AutoModelForCausalLM.from_config(cfg), ac.LoRA(r=4, targets=["q_proj", "v_proj"]))
    rows = {r.pattern: r for r in rep.unmatched}
    assert rows["model.layers.*.self_attn.k_proj"].reason.startswith("not in targets")
    experts = rows["model.layers.*.mlp.experts.gate_up_proj"]
    assert (experts.adapter, experts.weight_shape) == ("(graph)", (4, 64, 32))
    assert "not a linear-equivalent layer op" in experts.reason and "target_parameters" in experts.reason
    assert "MixtralTopKRouter" in rows["model.layers.*.mlp.gate.weight"].reason
    assert not any("q_proj" in p or "v_proj" in p for p in rows)  # adapted layers are not listed
    rep.print(unmatched=True)
    assert "seen in the graph and not adaptable" in capsys.readouterr().out
