"""An AdaptedModule under torch.distributed, on CPU with the gloo backend in 2 processes.

* DDP: the adapter gradients of 2 ranks (each on half the batch) equal single-process training on the
  combined batch, and stay equal over optimizer steps; only adapter tensors are communicated: the
  gradient buckets hold exactly the adapter parameters, and the frozen base (params and buffers) is
  neither broadcast at wrap time nor with the buffers on each forward.
* FSDP2 (`fully_shard`, with the frozen base as `ignored_params`): the adapters are sharded (DTensor),
  gradients equal single-process ones, and the base is left alone.

Both run in one `torch.multiprocessing.spawn` (two worker processes, a free port), once per session.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import adapt_compiler as ac

WORLD = 2
STEPS = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(6, 8)
        self.v_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("shift", torch.linspace(-1, 1, 8))

    def forward(self, x):
        return self.head(torch.relu(self.v_proj(self.q_proj(x) + self.shift)))


def build():
    torch.manual_seed(0)
    model = Net()
    return model, ac.compile(model, ac.LoRA(r=2, alpha=4, targets=["q_proj", "v_proj"], init=False), lowering="eager")


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(STEPS)]


def adapter_names(m) -> list[str]:
    return [n for n, p in m.named_parameters() if p.requires_grad]


def reference():
    """Single process, the combined batch: grads of the first step and params after STEPS SGD steps."""
    _, m = build()
    m.train()
    opt = torch.optim.SGD(m.adapter_parameters(), lr=0.1)
    grads = None
    for x, y in data():
        nn.functional.mse_loss(m(x), y).backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
    return grads, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def _ddp(rank: int) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    broadcasts, buckets = [], []
    real_broadcast = dist._broadcast_coalesced

    def recording_broadcast(pg, tensors, *a, **kw):
        broadcasts.append([tuple(t.shape) for t in tensors])
        return real_broadcast(pg, tensors, *a, **kw)

    dist._broadcast_coalesced = recording_broadcast
    try:
        model, m = build()
        if rank == 1:  # a different adapter init on rank 1: DDP must broadcast rank 0's adapters
            with torch.no_grad():
                for p in m.adapter_parameters():
                    p.add_(1.0)
        m.train()
        ddp = DDP(m)

        def recording_hook(state, bucket):
            buckets.append((bucket.buffer().numel(), [tuple(p.shape) for p in bucket.parameters()]))
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, recording_hook)
        opt = torch.optim.SGD(m.adapter_parameters(), lr=0.1)
        grads = None
        for x, y in data():
            sl = slice(rank * 2, rank * 2 + 2)
            nn.functional.mse_loss(ddp(x[sl]), y[sl]).backward()
            if grads is None:
                grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
            opt.step()
            opt.zero_grad()
    finally:
        dist._broadcast_coalesced = real_broadcast
    return {
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad},
        "broadcasts": broadcasts,
        "buckets": buckets,
        "adapter_shapes": sorted(tuple(p.shape) for p in m.adapter_parameters()),
        "ddp_params": len(ddp._module_parameters),
        "model_state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _fsdp2(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model, m = build()
    m.train()
    fully_shard(m, ignored_params=set(m.base.parameters()))
    sharded = sorted(n for n, p in m.named_parameters() if isinstance(p, DTensor))
    opt = torch.optim.SGD(m.adapter_parameters(), lr=0.1)
    grads = None
    for x, y in data():
        sl = slice(rank * 2, rank * 2 + 2)
        nn.functional.mse_loss(m(x[sl]), y[sl]).backward()
        if grads is None:
            grads = {n: p.grad.full_tensor().clone() for n, p in m.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in m.named_parameters() if p.requires_grad}
    base_sharded = [n for n, p in m.base.named_parameters() if isinstance(p, DTensor)]
    return {"grads": grads, "params": params, "sharded": sharded, "base_sharded": base_sharded,
            "model_state": {k: v.clone() for k, v in model.state_dict().items()}}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {"ddp": _ddp(rank)}
        try:
            result["fsdp2"] = _fsdp2(rank)
        except Exception as err:  # noqa: BLE001 - reported to the test, which says what failed
            result["fsdp2_error"] = f"{type(err).__name__}: {err}"
        dist.barrier()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return ranks, reference()


def _close(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {k}: {m}")


def test_ddp_gradients_equal_single_process_on_the_combined_batch(results):
    ranks, (ref_grads, ref_params) = results
    for r, res in enumerate(ranks):
        _close(res["ddp"]["grads"], ref_grads, f"rank {r} grads")
        _close(res["ddp"]["params"], ref_params, f"rank {r} params after {STEPS} steps")
    for k, v in ranks[0]["ddp"]["params"].items():
        assert torch.equal(v, ranks[1]["ddp"]["params"][k]), f"ranks diverged on {k}"


def test_ddp_communicates_only_adapter_tensors(results):
    ranks, _ = results
    for res in ranks:
        d = res["ddp"]
        n_adapter = sum(torch.Size(s).numel() for s in d["adapter_shapes"])
        assert d["ddp_params"] == len(d["adapter_shapes"]), "DDP holds parameters other than the adapters"
        # gradient buckets: exactly the adapter parameters, every step
        assert d["buckets"], "no gradient bucket was reduced"
        per_step = len(d["buckets"]) // STEPS
        for i in range(STEPS):
            step = d["buckets"][i * per_step:(i + 1) * per_step]
            assert sum(n for n, _ in step) == n_adapter
            assert sorted(s for _, shapes in step for s in shapes) == d["adapter_shapes"]
        # broadcasts (wrap time; buffers each forward): adapter tensors only, never the base or its buffers
        sent = sorted(s for call in d["broadcasts"] for s in call)
        assert sent == d["adapter_shapes"], f"broadcast non-adapter tensors: {sent}"


def test_user_model_unchanged_under_distributed_training(results):
    ranks, _ = results
    model, _ = build()
    for res in ranks:
        for key in ("ddp", "fsdp2"):
            if key in res:
                for k, v in model.state_dict().items():
                    assert torch.equal(res[key]["model_state"][k], v), f"{key}: user model {k} changed"


def test_fsdp2_fully_shard_trains_adapters(results):
    ranks, (ref_grads, ref_params) = results
    if "fsdp2_error" in ranks[0]:
        pytest.fail(f"FSDP2 fully_shard failed on CPU/gloo: {ranks[0]['fsdp2_error']}")
    for r, res in enumerate(ranks):
        f = res["fsdp2"]
        assert f["sharded"] == sorted(ref_grads), "FSDP2 should shard exactly the adapter parameters"
        assert not f["base_sharded"]
        _close(f["grads"], ref_grads, f"FSDP2 rank {r} grads")
        _close(f["params"], ref_params, f"FSDP2 rank {r} params after {STEPS} steps")
