"""Gate calibration: after it, each gated block's argmax gate executes its target share of images; training-mode
gates are untouched; the offsets are hook state that survives a restart."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from spnet_dist.engine.gate_calibration import GateCalibration, calibrate_gates
from spnet_dist.models import build_model

from conftest import TINY_MODEL

TARGETS = [0.3, 0.5, 0.7, 1.0]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, {"router": {"type": "aig", "hidden": 16, "bias_init": [0.1, 2.0]}})
    return model.eval()


def _batches(seed: int, n: int = 4, b: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.zeros(b)) for _ in range(n)]


@torch.no_grad()
def _eval_rates(model: nn.Module, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).gates for x, _ in batches]).mean(0)


def test_argmax_gates_execute_their_targets_after_calibration(one_torch_thread):
    model = _model()
    calib, fresh = _batches(1), _batches(2)
    before = _eval_rates(model, fresh)
    assert (before[:3] - torch.tensor(TARGETS[:3])).abs().max() > 0.2, "uncalibrated gates should miss the targets"
    offsets = calibrate_gates(model, lambda: iter(calib), TARGETS, num_batches=4)
    assert offsets[3] == 0.0 and all(o != 0.0 for o in offsets[:3])
    on_calib = _eval_rates(model, calib)
    torch.testing.assert_close(on_calib[:3], torch.tensor(TARGETS[:3]), atol=2 / 128, rtol=0)
    on_fresh = _eval_rates(model, fresh)  # images the calibration never saw
    assert (on_fresh[:3] - torch.tensor(TARGETS[:3])).abs().max() < 0.1, on_fresh


def test_a_router_with_one_margin_for_every_image_is_made_up_by_the_others(one_torch_thread):
    """Block 0's router outputs its bias whatever the image (no threshold can run 0.3 of the images): it stays at
    0, and blocks 1 and 2 are refitted so that the gated blocks still execute the mean target between them."""
    model = _model()
    with torch.no_grad():
        list(model.blocks())[0].router.fc2.weight.zero_()
    calib = _batches(1)
    calibrate_gates(model, lambda: iter(calib), TARGETS, num_batches=4)
    rates = _eval_rates(model, calib)
    assert rates[0] == 0.0
    assert abs(float(rates[:3].mean()) - sum(TARGETS[:3]) / 3) <= 2 / 128, rates
    assert rates[1] > TARGETS[1] + 0.1 and rates[2] > TARGETS[2] + 0.1, rates


def test_training_gates_ignore_the_offsets(one_torch_thread):
    model = _model()
    x = _batches(3, n=1)[0][0]
    model.train()
    torch.manual_seed(5)
    before = model(x).gate_logits.detach()
    calibrate_gates(model, lambda: iter(_batches(1)), TARGETS, num_batches=2)
    model.train()
    torch.manual_seed(5)
    torch.testing.assert_close(model(x).gate_logits.detach(), before, rtol=0, atol=0)


def test_offsets_are_hook_state_restored_before_training(one_torch_thread):
    model = _model()
    offsets = calibrate_gates(model, lambda: iter(_batches(1)), TARGETS, num_batches=2)
    state = {"offsets": offsets}
    restored = _model()
    hook = GateCalibration(2)
    hook.load_state_dict(state)
    hook.before_train(SimpleNamespace(engine=SimpleNamespace(module=restored)))
    batches = _batches(4, n=1)
    torch.testing.assert_close(_eval_rates(restored, batches), _eval_rates(model, batches), rtol=0, atol=0)
    assert hook.state_dict() == state


def test_calibrated_run_checkpoints_its_offsets_and_spnet_eval_applies_them(tiny_data, tmp_path):
    from conftest import last_json, run_spnet, tiny_train_args

    args = tiny_train_args(tiny_data, tmp_path, "method=aig", "method.target_rate=0.5", "trainer.epochs=2",
                           "eval.gate_calibration_batches=4")
    trained = last_json(run_spnet(*args, cwd=tmp_path).stdout)
    state = torch.load(f"{trained['checkpoint']}/mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    offsets = state["spnet"]["hooks"]["gate_calibration"]["offsets"]
    assert len(offsets) == 4 and any(o != 0.0 for o in offsets)
    evaluated = last_json(run_spnet("eval", f"checkpoint={trained['checkpoint']}", cwd=tmp_path).stdout)
    assert evaluated["block_rates"] == trained["block_rates"] and evaluated["top1"] == trained["top1"]


def test_calibration_pass_sees_a_seeded_sample_of_training_images_as_evaluation_does(tiny_data):
    """``eval.gate_calibration_transform=eval``: the pass is ``limit`` training images under the evaluation transform
    (the same tensors for the same seed, another sample for another seed), not augmented crops."""
    from spnet_dist.config import compose
    from spnet_dist.data.preflight import plan_data
    from spnet_dist.engine.trainer import fresh_train_pass

    from conftest import TINY_CLASSES

    cfg = compose([f"data.root={tiny_data}", f"model.num_classes={TINY_CLASSES}", "trainer.batch_size=8",
                   "data.image_size=32", "data.val_resize=36"])
    make = fresh_train_pass(cfg, plan_data(cfg, world=1), None)

    def images(seed: int, **kw) -> torch.Tensor:
        loader = make(seed, **kw)
        try:
            return torch.cat([x.float() for x, _ in loader])
        finally:
            getattr(loader, "release", lambda: None)()

    first, again = images(5, eval_transform=True, limit=16), images(5, eval_transform=True, limit=16)
    assert first.shape[0] == 16 and torch.equal(first, again)
    assert not torch.equal(first, images(6, eval_transform=True, limit=16))
    augmented = [images(5), images(5)]  # two augmented passes of the same seed agree, and differ from evaluation
    assert torch.equal(*augmented) and augmented[0].shape[0] == 64
    assert not any(torch.equal(first[i], a) for i in range(16) for a in augmented[0])


def test_heldout_calibration_images_are_kept_out_of_training_whatever_the_seed(tiny_data):
    import pytest

    from spnet_dist.config.compose import compose
    from spnet_dist.data.heldout import calibration_heldout
    from spnet_dist.data.loader import build_loader
    from spnet_dist.data.preflight import plan_data
    from spnet_dist.engine.trainer import build_loaders, fresh_train_pass

    from conftest import TINY_CLASSES

    def config(*extra: str):
        return compose([f"data.root={tiny_data}", f"model.num_classes={TINY_CLASSES}", "trainer.batch_size=8",
                        "data.image_size=32", "data.val_resize=36", "eval.gate_calibration_heldout=0.25", *extra])

    cfg = config()
    plan = plan_data(cfg, world=1)
    held = calibration_heldout(cfg, plan.train.files)
    assert len(held) == round(0.25 * len(plan.train.files)) and held == calibration_heldout(config("seed=3"),
                                                                                            plan.train.files)
    _, _, train_files = build_loaders(cfg, SimpleNamespace(train_exclusions=lambda files: []), plan)
    assert not set(train_files) & set(held) and set(train_files) | set(held) == set(plan.train.files)

    loader = fresh_train_pass(cfg, plan, train_files)(5, eval_transform=True, limit=1000, heldout=True)
    direct = build_loader(cfg, plan, train=False, shard_id=0, num_shards=1, files=held, split="train")
    try:
        seen = torch.cat([x.float() for x, _ in loader]).flatten(1).sum(1).sort().values
        expected = torch.cat([x.float() for x, _ in direct]).flatten(1).sum(1).sort().values
    finally:
        for ld in (loader, direct):
            getattr(ld, "release", lambda: None)()
    assert torch.equal(seen, expected)  # the calibration pass is the held-out images, as evaluation sees them

    with pytest.raises(ValueError, match="holds out no image"):
        calibration_heldout(config("eval.gate_calibration_heldout=0.001"), plan.train.files)
