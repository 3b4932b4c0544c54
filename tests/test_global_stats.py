"""1 rank x batch 2B and 2 ranks x batch B compute the same rate loss, gradients and teacher update."""
from __future__ import annotations

import io
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spnet_dist.config import compose
from spnet_dist.methods import build_method, prepare_method_cfg
from spnet_dist.models import build_model

B = 6


def _setup():
    cfg = compose(["method=spnet_code", "model.num_classes=4", "method.target_rate=0.5"])
    method_cfg = prepare_method_cfg(cfg.method, cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model, method_cfg).double()
    method = build_method(method_cfg, model)
    # hard decisions that differ per image and per block, so per-rank rates differ from the global ones
    gates = (torch.rand(2 * B, model.num_blocks, generator=torch.Generator().manual_seed(1)) > 0.35).double()
    return model, method, gates


def _step(model, method, gates: torch.Tensor):
    """Rate loss of the (global) batch and d loss / d gate, then one identical weight update + EMA."""
    gates = gates.clone().requires_grad_(True)
    loss, rates, _ = method.rate_terms(SimpleNamespace(gates=gates))
    loss.backward()
    world = dist.get_world_size() if dist.is_initialized() else 1
    grad = gates.grad / world  # the engine averages parameter gradients over ranks
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i % 3 - 1))
    method.ema_update(model)
    return loss.detach(), rates.detach(), grad, [t.clone() for t in method.replicated_tensors()]


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, method, gates = _setup()
    result = _step(model, method, gates[rank * B:(rank + 1) * B])
    buf = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
    torch.save((rank, result), buf)
    queue.put(buf.getvalue())
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_match_one_rank_on_the_global_batch():
    from spnet_dist.engine.run import free_port

    model, method, gates = _setup()
    loss1, rates1, grad1, teacher1 = _step(model, method, gates)
    local = gates[:B].mean(0)
    assert loss1 > 0 and not torch.allclose(local, gates.mean(0))  # a per-rank statistic would differ

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(torch.load(io.BytesIO(queue.get(timeout=120))) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (loss2, rates2, grad2, teacher2) in results.items():
        assert float(loss2) == pytest.approx(float(loss1), abs=1e-12)
        torch.testing.assert_close(rates2, rates1)
        torch.testing.assert_close(grad2, grad1[rank * B:(rank + 1) * B], atol=1e-12, rtol=1e-9)
        for t1, t2 in zip(teacher1, teacher2, strict=True):
            assert torch.equal(t1, t2)
