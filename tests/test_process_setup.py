"""Per-process set-up of training runs: the CPU malloc thresholds and where DeepSpeed builds its JIT ops."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
from spnet_dist.engine.malloc import keep_freed_memory
tuned = sys.argv[1] == "tuned"
if tuned:
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = 24 * 1024 * 1024  # one ResNet-50 layer1 activation at batch 8 is ~25 MiB
def step():  # what a training step does: allocate its activations, free them all, again next step
    bufs = [bytearray(block) for _ in range(4)]
    del bufs
step()  # first touch: page faults in both cases
before = faults()
for _ in range(5):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reallocating_a_freed_block_needs_no_new_page_faults():
    """``engine.malloc.keep_freed_memory``: freed activation-sized blocks stay in the process. Each case runs in a
    fresh interpreter: the thresholds are process-wide and cannot be reset."""
    def new_faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
        return int(out.stdout.strip())

    pages = 24 * 1024 * 1024 // 4096
    assert new_faults("default") > 5 * pages  # glibc returns the freed blocks to the kernel: they fault again
    assert new_faults("tuned") < pages // 10  # kept in the heap: re-used without faults


def test_deepspeed_ops_are_built_inside_this_environment(monkeypatch, tmp_path):
    from spnet_dist.engine.setup import extensions_dir_per_environment

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    (tmp_path / "venv").mkdir()
    extensions_dir_per_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "venv" / "torch_extensions")
    assert (tmp_path / "venv" / "torch_extensions").is_dir()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))  # an explicit choice wins
    extensions_dir_per_environment()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "missing" / "venv"))  # cannot be created: torch's default
    extensions_dir_per_environment()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ


@pytest.mark.parametrize("no_decay_bn", [False, True])
def test_router_lr_mult_puts_the_routers_in_their_own_group_through_the_schedule(no_decay_bn):
    """optim.router_lr_mult: the routers (and only they) learn at lr × mult, and the LR schedule keeps the ratio
    (its warm-up/milestone factor multiplies each group's own initial lr); mult 1 keeps the papers' single group."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from spnet_dist.engine.hooks import LRSchedule
    from spnet_dist.engine.setup import build_optimizer
    from spnet_dist.methods.build import build_from_config

    model, _ = build_from_config({"name": "resnet_tiny"}, {"name": "aig"}, pretrained=False)
    routers = {id(p) for p in model.router_parameters()}
    optim = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                              "router_lr_mult": 10.0, "no_decay_bn": no_decay_bn, "milestones": [1], "gamma": 0.1,
                              "warmup_epochs": 0})
    opt = build_optimizer(model, optim)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter once
    for g in opt.param_groups:
        in_routers = {id(p) in routers for p in g["params"]}
        assert len(in_routers) == 1 and g["lr"] == pytest.approx(1.0 if in_routers == {True} else 0.1)
    sched = LRSchedule(opt, optim)
    loop = SimpleNamespace(steps_per_epoch=2, progress=SimpleNamespace(epoch=1, batch_in_epoch=0), world=1, rank=0,
                           cfg=OmegaConf.create({"trainer": {"batch_size": 8}}))
    sched.before_train(loop)  # resumed after the milestone: every group at 0.1 × its own rate
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 if {id(p) in routers for p in g["params"]} == {True} else 0.01)
    single = build_optimizer(model, OmegaConf.merge(optim, {"router_lr_mult": 1.0, "no_decay_bn": False}))
    assert len(single.param_groups) == 1 and isinstance(single, torch.optim.SGD)
