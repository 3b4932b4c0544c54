"""ConvNet-AIG gate init (spec §2.b, official ``convnet_aig.py``): applied after the routers are attached, so the
backbone init does not decide it. ImageNet: fc1 weight N(0, sqrt(2/(1*1*16))) = N(0, 0.3536), fc1 bias PyTorch's
U(+-1/sqrt(C_in)); fc2 weight N(0, 0.001), fc2 bias [0.1, 2]. CIFAR (official ResNet_cifar): fc1 PyTorch's default."""
from __future__ import annotations

import math

import pytest
import torch

from spnet_dist.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gates(model):
    model.requires_grad_(False)  # plain tensors for the statistics below
    return [blk.router for blk in model.blocks() if blk.router is not None]


def test_imagenet_gate_init_is_the_official_one() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", {"router": {"type": "aig"}})
    last = _gates(model)[-1]  # layer4.2: fc1 2048 -> 16, 32768 weights
    w = last.fc1.weight
    assert w.shape == (16, 2048, 1, 1)
    assert float(w.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 16), rel=0.02)  # PyTorch's default would be ~0.0128
    assert float(last.fc1.bias.abs().max()) <= 1 / math.sqrt(2048)
    fc2 = torch.cat([g.fc2.weight.flatten() for g in _gates(model)])  # 16 gates x 32 weights
    assert float(fc2.std()) == pytest.approx(0.001, rel=0.15)
    for g in _gates(model):
        assert torch.equal(g.fc2.bias, torch.tensor([0.1, 2.0]))  # exact (float32)
        assert torch.equal(g.bn.weight, torch.ones(16)) and torch.equal(g.bn.bias, torch.zeros(16))
    first = _gates(model)[0]  # layer1.0: 64 -> 16, the same std at every width
    assert float(torch.cat([g.fc1.weight.flatten() for g in _gates(model)]).std()) == pytest.approx(
        math.sqrt(2 / 16), rel=0.02)
    assert first.fc1.weight.shape == (16, 64, 1, 1)


def test_cifar_gate_keeps_pytorch_default_fc1_as_the_official_cifar_code() -> None:
    torch.manual_seed(0)
    model = build_model("resnet110_cifar", {"router": {"type": "aig"}})
    w = torch.cat([g.fc1.weight.flatten() for g in _gates(model) if g.fc1.in_channels == 64])
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64: U(+-1/8)
    assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(g.fc2.bias.tolist()[1] == 2.0 for g in _gates(model))


@pytest.mark.parametrize("init,std", [("pytorch", 1 / math.sqrt(2048) / math.sqrt(3)),
                                      ("he_fan_out", math.sqrt(2 / 16))])
def test_deviations_are_options(init: str, std: float) -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", {"router": {"type": "aig", "init": init}})
    assert float(_gates(model)[-1].fc1.weight.std()) == pytest.approx(std, rel=0.03)
    with pytest.raises(ValueError, match="unknown AIG gate init"):
        build_model("resnet_tiny", {"router": {"type": "aig", "init": "xavier"}})


def test_the_aig_method_config_uses_the_official_init() -> None:
    from spnet_dist.config import compose

    cfg = compose(["method=aig"])
    assert cfg.method.router.init == "official"
