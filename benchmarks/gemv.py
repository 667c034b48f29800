"""One-row products `x @ W.t()` (the linear layers of a batch-1 decode step): BLAS vs Inductor's reduction.

    python -m benchmarks.gemv                          # the standard config's shapes and two large ones
    python -m benchmarks.gemv --shapes 1024x512 --rows 1,8

For each weight shape (out x in), float32, a list of weights larger than the L3 cache is multiplied by
one activation row per call, so every weight streams from memory as in decode: eager `x @ W.t()`
(MKL's GEMV/GEMM), the same compiled by Inductor, and Inductor's fused reduction
`(x[:, :, None] * W.t()[None]).sum(-2)` (what `decompose_mm_pass` writes, lowering/gemv.py), and the
reduction with the weight's rows outermost (what FewRowProducts writes for 2..8 rows). Prints
the weight bytes read per second. `--clock thread` (the default) times the CPU time of the calling
thread on one torch thread, which a shared machine disturbs least.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = ("512x512", "1024x512", "512x1024", "2000x512", "4096x4096", "4096x11008")


def _weights(out: int, inp: int, megabytes: int = 64) -> list[torch.Tensor]:
    n = max(2, megabytes * 2**20 // (out * inp * 4))
    g = torch.Generator().manual_seed(0)
    return [torch.randn(out, inp, generator=g) for _ in range(n)]


def _gb_per_s(fn, x, weights, clock, rounds: int = 15) -> float:
    for _ in range(3):
        fn(x, *weights)
    times = []
    for _ in range(rounds):
        t = clock()
        fn(x, *weights)
        times.append(clock() - t)
    return sum(w.numel() * 4 for w in weights) / statistics.median(times) / 2**30


def blas(x, *weights):
    return [x @ w.t() for w in weights]


def reduction(x, *weights):
    return [(x[:, :, None] * w.t()[None]).sum(-2) for w in weights]


def weight_rows_outermost(x, *weights):
    """What FewRowProducts (lowering/gemv.py) writes for 2..8 rows: each weight row read once for all of x."""
    return [(w[:, None, :] * x[None]).sum(-1).t().contiguous() for w in weights]


def main(shapes=SHAPES, rows=(1,), clock: str = "thread") -> dict:
    if clock == "thread":
        torch.set_num_threads(1)
    now = time.thread_time if clock == "thread" else time.perf_counter
    # one static compile per (shape, rows) and variant: past Dynamo's default limit of 8 it would fall back
    # to eager and report eager's speed under the compiled name
    torch._dynamo.config.recompile_limit = 4 * len(shapes) * len(rows)
    variants = {"eager x @ W.t()": blas, "compiled x @ W.t()": torch.compile(blas, dynamic=False),
                "compiled reduction": torch.compile(reduction, dynamic=False),
                "compiled reduction, weight rows outermost": torch.compile(weight_rows_outermost, dynamic=False)}
    results = {}
    for shape in shapes:
        out, inp = (int(d) for d in shape.split("x"))
        weights = _weights(out, inp)
        for m in rows:
            x = torch.randn(m, inp)
            row = {name: _gb_per_s(fn, x, weights, now) for name, fn in variants.items()}
            results[f"{shape}, {m} row(s)"] = row
            print(f"{shape:>11} x {m} row(s): " + ", ".join(f"{k} {v:5.1f} GB/s" for k, v in row.items()), flush=True)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread")
    a = p.parse_args()
    main(tuple(a.shapes.split(",")), tuple(int(r) for r in a.rows.split(",")), a.clock)
