"""Benchmark configurations per method: (our spec, the same adapter as a PEFT config).

The standard config (issue 2): adapters on q/k/v/o, r=16; OFT block 32, BOFT block 8 with 2
butterfly factors, HRA r=8, X-LoRA 4 experts r=16, Llama-Adapter len 10 on the top 2 layers.
A method that is not registered is skipped.
"""

from __future__ import annotations

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def configs():
    import peft

    import adapt_compiler as ac

    def have(name):
        return name in ac.METHODS

    out = {}
    out["lora"] = (lambda: ac.LoRA(r=16, alpha=32, targets=ATTN),
                   lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN))
    out["dora"] = (lambda: ac.LoRA(r=16, alpha=32, targets=ATTN, use_dora=True),
                   lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN, use_dora=True))
    if have("loha"):
        out["loha"] = (lambda: ac.LoHa(r=16, alpha=32, targets=ATTN),
                       lambda: peft.LoHaConfig(r=16, alpha=32, target_modules=ATTN))
    if have("lokr"):
        out["lokr"] = (lambda: ac.LoKr(r=16, alpha=32, targets=ATTN),
                       lambda: peft.LoKrConfig(r=16, alpha=32, target_modules=ATTN))
    if have("adalora"):
        out["adalora"] = (lambda: ac.AdaLoRA(init_r=16, target_r=8, total_step=1000, targets=ATTN),
                          lambda: peft.AdaLoraConfig(init_r=16, target_r=8, total_step=1000, target_modules=ATTN))
    if have("bone"):
        out["miss"] = (lambda: ac.Bone(r=16, targets=ATTN),
                       lambda: peft.MissConfig(r=16, target_modules=ATTN))
    if have("oft"):
        out["oft"] = (lambda: ac.OFT(r=0, oft_block_size=32, targets=ATTN),
                      lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=ATTN))
    if have("boft"):
        out["boft"] = (lambda: ac.BOFT(boft_block_size=8, boft_n_butterfly_factor=2, targets=ATTN),
                       lambda: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=ATTN))
    if have("hra"):
        out["hra"] = (lambda: ac.HRA(r=8, targets=ATTN), lambda: peft.HRAConfig(r=8, target_modules=ATTN))
    if have("llama_adapter"):
        out["llama_adapter"] = (lambda: ac.LlamaAdapter(adapter_len=10, adapter_layers=2),
                                lambda: peft.AdaptionPromptConfig(adapter_len=10, adapter_layers=2,
                                                                  task_type="CAUSAL_LM"))
    return out
