"""LoKr and LoHa on a Conv2d network: two named adapters, trained, compared, merged.

    python examples/conv_lokr_loha.py

A small diffusers-style conv net (GroupNorm, SiLU, residual blocks) learns to imitate a "teacher"
(the same net with perturbed conv weights) through either a LoKr adapter (ΔW = W1 ⊗ (W2a·W2b),
Kronecker) or a LoHa adapter (ΔW = (W1a·W1b) ⊙ (W2a·W2b), Hadamard) on its 3×3 convolutions.
PEFT equivalents: `LoKrConfig(r=4, target_modules=[...])`, `LoHaConfig(...)`. Both merge exactly
into the conv weights for inference (`m.merge()`, or `m.merged_module()` for a plain nn.Module).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.nn import functional as F

import adapt_compiler as ac
from adapt_compiler.progress import progress

TARGETS = ["conv1", "conv2"]


class Block(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(4, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class ConvNet(nn.Module):
    def __init__(self, ch: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.block1, self.block2 = Block(ch), Block(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.block2(self.block1(self.conv_in(x)))))


def methods_available() -> list[str]:
    """The methods this example needs that this version does not register."""
    return [m for m in ("lokr", "loha") if m not in ac.METHODS]


def main(steps: int = 60, quiet: bool = False, lowering: str = "inductor") -> dict:
    missing = methods_available()
    if missing:
        raise SystemExit(f"this example needs {missing}, which this adapt_compiler does not register")
    say = (lambda *a: None) if quiet else print
    torch.manual_seed(0)
    model = ConvNet().eval()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in teacher.named_modules():
            if name.split(".")[-1] in TARGETS:
                mod.weight.add_(0.05 * torch.randn_like(mod.weight))

    specs = {
        "lokr": ac.LoKr(r=4, alpha=4, targets=TARGETS),
        "loha": ac.LoHa(r=4, alpha=4, targets=TARGETS),
    }
    m = ac.compile(model, specs, lowering=lowering)
    g = torch.Generator().manual_seed(0)
    test_x = torch.randn(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        test_y = teacher(test_x)
    result = {}
    for name in specs:
        m.set_adapter(name)
        m.train()
        opt = torch.optim.AdamW(m.adapter_parameters(), lr=3e-3)
        with torch.no_grad():
            start = F.mse_loss(m(test_x), test_y).item()  # = the base model's error: both start at identity
        for _ in progress(range(steps), desc=f"train {name}", quiet=quiet):
            x = torch.randn(8, 3, 16, 16, generator=g)
            with torch.no_grad():
                y = teacher(x)
            loss = F.mse_loss(m(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        m.eval()
        with torch.no_grad():
            end = F.mse_loss(m(test_x), test_y).item()
            unmerged = m(test_x)
            m.merge()  # ΔW folded into the conv weights (the originals are kept)
            merged_err = (m(test_x) - unmerged).abs().max().item()
            m.unmerge()
        n = sum(p.numel() for p in m.adapter_parameters())
        say(f"{name}: {n:,} params; test MSE to teacher {start:.4f} -> {end:.4f}; "
            f"merged vs unmerged |Δ| {merged_err:.1e}")
        result[name] = {"mse_before": start, "mse_after": end, "merge_error": merged_err, "params": n}
    plain = m.merged_module()  # plain ConvNet with the active adapter (loha) folded in
    with torch.no_grad():
        result["merged_module_error"] = (plain(test_x) - m(test_x)).abs().max().item()
    if not quiet:
        m.report().print()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    main(steps=args.steps, quiet=args.quiet, lowering=args.lowering)
