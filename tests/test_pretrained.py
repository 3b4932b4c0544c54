"""The papers' recipe through the real stack: a ``method=static`` run (the plain ResNet; ``model.num_classes`` left at
``auto``), its checkpoint as ``model.pretrained`` of a dynamic run (backbone only, routers fresh), and the errors
for a checkpoint of another backbone."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_CLASSES, last_json, run_spnet

from spnet_dist.config import ConfigError, compose
from spnet_dist.methods import build_method, prepare_method_cfg
from spnet_dist.models import StateDictError, build_model, cost_table
from spnet_dist.models.pretrained import CLIENT_KEY, LATEST, MODEL_FILE
from spnet_dist.preflight import check_static, preflight

SIZE = 32  # data.image_size of the runs


def _args(data: Path, tmp: Path, ckpt: str, *extra: str) -> list[str]:
    """``spnet train`` on the tiny data without ``model.num_classes`` (auto)."""
    return ["train", f"data.root={data}", f"checkpoint.dir={tmp / ckpt}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            "trainer.batch_size=8", "trainer.progress=false", f"data.image_size={SIZE}", "data.val_resize=36", *extra]


def _module(tag: Path) -> dict[str, torch.Tensor]:
    return torch.load(tag / MODEL_FILE, map_location="cpu", weights_only=False)["module"]


def _params(db: Path, run_id: str) -> dict[str, str]:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id).data.params


def _tiny(**model) -> dict:
    return {"name": "resnet_tiny", "num_classes": TINY_CLASSES, **model}


def hand_count_tiny(size: int, classes: int) -> int:
    """MACs per image of the plain resnet_tiny (bottleneck v1.5, [1,1,1,1] x [8,16,32,64], stem 16), by hand."""
    h = size // 2
    macs, c = 7 * 7 * 3 * 16 * h * h, 16  # 7x7/2 stem conv
    h //= 2  # 3x3/2 max-pool
    for i, w in enumerate([8, 16, 32, 64]):
        ho = h // (1 if i == 0 else 2)
        macs += c * w * h * h + 9 * w * w * ho * ho + w * 4 * w * ho * ho  # 1x1, 3x3 (stride), 1x1 (x4)
        macs += c * 4 * w * ho * ho  # projection shortcut of the stage's first block
        c, h = 4 * w, ho
    return macs + c * classes


@pytest.fixture(scope="module")
def static_run(tiny_data, tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("static")
    proc = run_spnet(*_args(tiny_data, tmp, "static", "method=static", "trainer.epochs=1"), cwd=tmp)
    return last_json(proc.stdout), tmp


def test_static_trains_with_num_classes_from_the_data(static_run):
    s, tmp = static_run
    assert s["method"] == "static" and s["steps"] == TINY_CLASSES * 16 // 8
    assert s["exec_rate"] == 1.0 and s["block_rates"] == [1.0] * 4
    table = cost_table(build_model(_tiny(), {"router": {"type": "aig"}}), SIZE)
    assert s["macs_per_image"] == table.backbone_full == hand_count_tiny(SIZE, TINY_CLASSES)
    state = torch.load(Path(s["checkpoint"]) / MODEL_FILE, map_location="cpu", weights_only=False)
    assert state[CLIENT_KEY]["config"]["model"]["num_classes"] == TINY_CLASSES  # auto, resolved before the model
    assert not any(".router." in k or k.startswith("aux.") for k in state["module"])
    params = _params(tmp / "mlflow.db", s["mlflow_run_id"])
    assert params["model.num_classes"] == str(TINY_CLASSES) and params["method.router.type"] == "none"
    # spnet eval rebuilds the network with the checkpoint's number of classes
    ev = last_json(run_spnet("eval", f"checkpoint={s['checkpoint']}", cwd=tmp).stdout)
    assert ev["top1"] == pytest.approx(s["top1"]) and ev["macs_per_image"] == s["macs_per_image"]


@pytest.mark.parametrize("where", ["tag", "parent", "file"])
def test_pretrained_loads_exactly_the_backbone(static_run, where):
    s, _ = static_run
    tag = Path(s["checkpoint"])
    assert (tag.parent / LATEST).read_text().strip() == tag.name
    path = {"tag": tag, "parent": tag.parent, "file": tag / MODEL_FILE}[where]
    method = {"router": {"type": "aig", "hidden": 16}}
    torch.manual_seed(3)
    fresh = build_model(_tiny(), method)
    torch.manual_seed(3)
    model = build_model({**_tiny(), "pretrained": str(path)}, method)
    saved = _module(tag)
    own = model.state_dict()
    backbone = [k for k in own if model.is_backbone_key(k)]
    assert set(backbone) == set(saved) and len(backbone) > 40
    for k in backbone:
        assert own[k].dtype == saved[k].dtype and torch.equal(own[k], saved[k]), k
    routers = [k for k in own if ".router." in k]
    assert len(routers) > 0
    for k in routers:  # routers at their init
        assert torch.equal(own[k], fresh.state_dict()[k]), k
    assert not all(torch.equal(fresh.state_dict()[k], saved[k]) for k in backbone if "weight" in k)


def test_pretrained_refuses_another_backbone(static_run):
    s, _ = static_run
    method = {"router": {"type": "aig"}}
    with pytest.raises(StateDictError) as err:  # another depth
        build_model({**_tiny(layers=[2, 1, 1, 1]), "pretrained": s["checkpoint"]}, method)
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert "missing key(s): layer1.1.bn1.bias" in msg and "Blocks only in the model: layer1.1." in msg
    assert "model.layers=[1, 1, 1, 1]" in msg
    with pytest.raises(StateDictError, match=r"shape mismatch\(es\): fc\.weight \(checkpoint \[4, 256\] vs model "
                                             r"\[4, 128\]\), layer4\.0\.bn1\.bias"):  # other widths
        build_model({**_tiny(widths=[8, 16, 32, 32]), "pretrained": s["checkpoint"]}, method)
    with pytest.raises(StateDictError, match=r"fc\.bias \(checkpoint \[4\] vs model \[10\]\)"):
        build_model({**_tiny(num_classes=10), "pretrained": s["checkpoint"]}, method)


def test_dynamic_run_starts_from_the_static_run(static_run, tiny_data, tmp_path):
    s, _ = static_run
    tag = Path(s["checkpoint"])
    # optim.lr=0: two real steps that leave every trained parameter where the static run left it
    proc = run_spnet(*_args(tiny_data, tmp_path, "aig", "method=aig", f"model.pretrained={tag}", "trainer.max_steps=2",
                            "optim.lr=0"), cwd=tmp_path)
    d = last_json(proc.stdout)
    assert d["method"] == "aig" and d["steps"] == 2 and len(d["block_rates"]) == 4
    after, before = _module(Path(d["checkpoint"])), _module(tag)
    names = {n for n, _ in build_model(_tiny(), {"router": {"type": "aig"}}).named_parameters()}
    shared = [k for k in before if k in names]
    assert len(shared) > 20 and all(torch.equal(after[k], before[k]) for k in shared)
    assert any(".router." in k for k in after)
    assert _params(tmp_path / "mlflow.db", d["mlflow_run_id"])["model.pretrained"] == str(tag)


def test_static_method_and_pretrained_in_the_preflight(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"method.router.type='aig' is not valid; choose one of none"):
        check_static(compose(["method=static", "method.router.type=aig"]))
    with pytest.raises(ConfigError, match=r"model.num_classes='ten' is not valid; give a positive integer or auto"):
        check_static(compose(["model.num_classes=ten"]))
    cfg = compose([f"data.root={tiny_data}", "trainer.batch_size=8"])
    assert cfg.model.num_classes == "auto"
    preflight(cfg)
    assert cfg.model.num_classes == TINY_CLASSES  # written before the model is built
    with pytest.raises(ConfigError, match=rf"^model.num_classes=10 but data.root='{tiny_data}' has {TINY_CLASSES} "):
        preflight(compose([f"data.root={tiny_data}", "model.num_classes=10", "trainer.batch_size=8"]))
    with pytest.raises(ValueError, match="model.num_classes=auto is the number of class folders"):
        build_model({"name": "resnet_tiny", "num_classes": "auto"})
    with pytest.raises(FileNotFoundError, match="model.pretrained='.*nope' does not exist"):
        preflight(compose([f"data.root={tiny_data}", f"model.pretrained={tmp_path / 'nope'}"]))
    (tmp_path / "ckpt" / "global_step1").mkdir(parents=True)
    (tmp_path / "ckpt" / "global_step1" / MODEL_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="lies in this run's checkpoint.dir"):
        preflight(compose([f"data.root={tiny_data}", f"model.pretrained={tmp_path / 'ckpt' / 'global_step1'}",
                           f"checkpoint.dir={tmp_path / 'ckpt'}"]))


def test_static_baseline_model_and_objective():
    cfg = compose(["method=static", f"model.num_classes={TINY_CLASSES}"])
    mcfg = prepare_method_cfg(cfg.method, cfg.model)
    model = build_model(cfg.model, mcfg)
    assert list(model.router_parameters()) == [] and list(model.head_parameters()) == []
    assert model.gated_blocks == [False] * 4 and all(model.is_backbone_key(k) for k in model.state_dict())
    method = build_method(mcfg, model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, SIZE, SIZE, generator=g), torch.randint(0, TINY_CLASSES, (4,), generator=g)
    out = model(x)
    loss, logs = method.loss(model, x, y, out)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(out.logits, y))  # CE only
    assert logs["exec_rate"].item() == 1.0 and logs["block_rates"].tolist() == [1.0] * 4
    table = cost_table(model, SIZE)
    gated = cost_table(build_model(cfg.model, {"router": {"type": "aig"}}), SIZE)
    assert table.routers == 0 and table.heads == 0 and table.full() == table.backbone_full == gated.backbone_full
    assert table.full() == hand_count_tiny(SIZE, TINY_CLASSES)
    with pytest.raises(ValueError, match="method=static trains the plain ResNet"):
        build_method(mcfg, build_model(cfg.model, {"router": {"type": "aig"}}))


def test_checkpoint_layout_names_match_the_engine():
    from spnet_dist.engine import checkpoint, eval_checkpoint

    assert (MODEL_FILE, LATEST, CLIENT_KEY) == (eval_checkpoint.MODEL_FILE, checkpoint.LATEST, checkpoint.CLIENT_KEY)


def test_an_older_checkpoint_config_takes_todays_data_and_eval_overrides():
    """A checkpoint written before a ``data.*`` / ``eval.*`` key existed: ``spnet eval`` and ``spnet study --static``
    add the key at its default (keeping the checkpoint's own values), so an override of it applies."""
    from omegaconf import OmegaConf

    from spnet_dist.config.compose import compose, to_container
    from spnet_dist.engine.eval_checkpoint import with_new_run_keys

    saved = to_container(compose(["eval.execution=skip"]))
    del saved["eval"]["gate_calibration_heldout"], saved["data"]["val_resize"]
    cfg = with_new_run_keys(OmegaConf.create(saved))
    OmegaConf.set_struct(cfg, True)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["eval.gate_calibration_heldout=0.1"]))
    assert cfg.eval.gate_calibration_heldout == 0.1 and cfg.eval.execution == "skip"
    assert cfg.data.val_resize == compose([]).data.val_resize
