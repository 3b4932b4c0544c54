"""Engine options of issue 15: ``optim.grad_clamp`` (SP-Net's element-wise CIFAR clamp, through the real DeepSpeed
engine on 2 gloo ranks), ``optim.lr_reference_batch`` / ``optim.recipe_global_batch`` (linear lr scaling and the
recipe-batch warning), ``model.sync_bn`` (conversion; refused on CPU multi-rank) and how a resume treats them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn as nn
from conftest import last_json, run_spnet, tiny_train_args

from spnet_dist.config import ConfigError, compose
from spnet_dist.engine.lr_scale import lr_note, scaled_lr
from spnet_dist.engine.resume_config import check_resume_config
from spnet_dist.engine.sync_bn import convert_sync_bn
from spnet_dist.config import to_container

# One SGD step of a 1x4 linear layer on 2 ranks: rank r's input row is C[r], so the weight's gradient is the rank
# average of C (DeepSpeed all-reduces it); the clamp acts on that average, before weight decay and momentum.
STEP_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.nn as nn
    from omegaconf import OmegaConf
    from spnet_dist.engine.setup import build_optimizer, deepspeed_config, init_distributed
    import deepspeed
    init_distributed(60)
    import torch.distributed as dist
    rank, out = dist.get_rank(), {}
    C = [[2.0, -3.0, 0.2, -0.4], [1.0, 0.6, 0.4, -0.2]]
    for stage in (0, 1, 2):
        torch.manual_seed(0)
        model = nn.Linear(4, 1, bias=False)
        w0 = model.weight.detach().clone()
        optim = OmegaConf.create({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": False,
                                  "fused": True, "grad_clamp": float(sys.argv[2])})
        run = OmegaConf.create({"trainer": {"batch_size": 1},
                                "deepspeed": {"stage": stage, "gradient_clipping": 0.0, "bf16_autocast": False}})
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, optim),
                                          config=deepspeed_config(run, 2))  # the trainer's own DeepSpeed config
        loss = engine(torch.tensor([C[rank]])).sum()
        engine.backward(loss)
        engine.step()
        out[stage] = {"w0": w0.tolist(), "w1": engine.module.weight.detach().tolist()}
    bn = nn.SyncBatchNorm(3)
    try:
        bn(torch.randn(4, 3, 2, 2))
        out["sync_bn_cpu"] = "ran"
    except Exception as err:
        out["sync_bn_cpu"] = f"{type(err).__name__}: {err}"
    if rank == 0:
        open(sys.argv[1], "w").write(json.dumps(out))
''')


def _two_rank_step(tmp: Path, bound: float) -> dict:
    script, result = tmp / "step.py", tmp / f"step_{bound}.json"
    script.write_text(STEP_SCRIPT)
    port = str(29700 + os.getpid() % 200)
    procs = [subprocess.Popen([sys.executable, str(script), str(result), str(bound)], cwd=tmp, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "OMP_NUM_THREADS": "1"}) for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return json.loads(result.read_text())


def test_grad_clamp_is_elementwise_on_the_reduced_gradient(tmp_path):
    """Official CIFAR operation: p.grad.clamp_(-0.5, 0.5) for every element, then SGD (wd, momentum). The gradient
    (rank average) is [1.5, -1.2, 0.3, -0.3]: two elements clamp, two pass; a norm clip would scale all four."""
    out = _two_rank_step(tmp_path, 0.5)
    grad = torch.tensor([[1.5, -1.2, 0.3, -0.3]])
    for stage in ("0", "1", "2"):  # ZeRO-0: the params' .grad; ZeRO-1/2: the flat fp32 partitions
        w0, w1 = torch.tensor(out[stage]["w0"]), torch.tensor(out[stage]["w1"])
        expected = w0 - 0.1 * (grad.clamp(-0.5, 0.5) + 0.01 * w0)  # first step: momentum buffer = d_p
        torch.testing.assert_close(w1, expected, rtol=0, atol=1e-7, msg=f"ZeRO stage {stage}")
        unclamped = w0 - 0.1 * (grad + 0.01 * w0)
        assert not torch.allclose(w1, unclamped)
    # torch's SyncBatchNorm does not run on CPU tensors under a (gloo) process group: why model.sync_bn is refused
    assert out["sync_bn_cpu"].startswith("ValueError") and "GPU" in out["sync_bn_cpu"], out["sync_bn_cpu"]


def test_deepspeed_norm_clip_off_unless_asked():
    """DeepSpeed's own default is a norm clip at 1.0: the trainer's config must say 0 when the key is 0."""
    from spnet_dist.engine.setup import deepspeed_config

    assert deepspeed_config(compose([]), 2)["gradient_clipping"] == 0.0
    assert deepspeed_config(compose(["deepspeed.gradient_clipping=5"]), 2)["gradient_clipping"] == 5.0


def test_grad_clamp_in_cifar_schedule_only():
    assert compose([]).optim.grad_clamp is None
    assert compose(["schedule=cifar_spnet"]).optim.grad_clamp == 0.5
    with pytest.raises(ConfigError, match="optim.grad_clamp"):
        compose(["optim.grad_clamp=abc"])


def test_lr_scale_rules():
    cfg = compose(["schedule=imagenet_spnet"])
    assert cfg.optim.recipe_global_batch == 256 and scaled_lr(cfg.optim, 1024) == 0.05  # no scaling asked
    level, line = lr_note(cfg.optim, 1024, 64, 16)
    assert level == "warning" and "256" in line and "optim.lr_reference_batch=256" in line and "\n" not in line
    assert lr_note(cfg.optim, 256, 64, 4) is None  # the recipe's own global batch
    scaled = compose(["schedule=imagenet_spnet", "optim.lr_reference_batch=256"])
    assert scaled_lr(scaled.optim, 1024) == pytest.approx(0.2)
    assert lr_note(scaled.optim, 1024, 64, 16)[0] == "info"
    assert lr_note(compose([]).optim, 1024, 64, 16) is None  # no preset reference: nothing to say


def test_two_ranks_log_the_scaled_lr(tiny_data, tmp_path):
    """2 ranks x 8 = global 16 with optim.lr 0.1 given for 64: the lr used (and logged) is 0.025."""
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.nprocs=2", "trainer.max_steps=2",
                                      "optim.lr=0.1", "optim.lr_reference_batch=64"), cwd=tmp_path)
    assert "lr scaled linearly: optim.lr 0.1 x global batch 16 (2 ranks x 8) / optim.lr_reference_batch 64 = " \
           "0.025" in proc.stderr
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = last_json(proc.stdout)["mlflow_run_id"]
    lrs = [m.value for m in client.get_metric_history(run_id, "train/lr")]
    assert lrs and all(v == pytest.approx(0.025) for v in lrs)
    assert client.get_run(run_id).data.tags["spnet.lr_used"] == "0.025"


def test_sync_bn_conversion_and_cpu_refusal():
    from spnet_dist.methods.build import build_from_config
    from spnet_dist.preflight import preflight

    cfg = compose(["method=spnet_code", "model.num_classes=4"])
    model, _ = build_from_config(cfg.model, cfg.method, pretrained=False)
    bns = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert any(t is nn.BatchNorm1d for t in bns.values())  # the SP-Net routers' BN1d
    keys = set(model.state_dict())
    assert convert_sync_bn(model, True, 1, cuda=True) is model and not any(  # one rank: nothing to synchronise
        isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    synced = convert_sync_bn(model, True, 2, cuda=True)
    assert {n for n, m in synced.named_modules() if isinstance(m, nn.SyncBatchNorm)} == set(bns)
    assert set(synced.state_dict()) == keys  # checkpoints load into either form
    with pytest.raises(ConfigError, match="model.sync_bn=true needs CUDA"):
        convert_sync_bn(model, True, 2, cuda=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.sync_bn=true needs CUDA"):
            preflight(compose(["model.sync_bn=true", "trainer.nprocs=2"]), data=False)
        preflight(compose(["model.sync_bn=true", "trainer.nprocs=1"]), data=False)  # one rank: a no-op


def test_resume_classifies_the_new_keys(tmp_path):
    saved = to_container(compose([]))
    for safe in ("optim.grad_clamp=0.5", "optim.lr_reference_batch=256", "optim.recipe_global_batch=256"):
        changes = check_resume_config(compose([safe]), saved, tmp_path)
        assert [c[0] for c in changes] == [safe.split("=")[0]]
    with pytest.raises(ConfigError, match=r"resume_allow=\[model.sync_bn\]"):
        check_resume_config(compose(["model.sync_bn=true"]), saved, tmp_path)
    assert check_resume_config(compose(["model.sync_bn=true", "resume_allow=[model.sync_bn]"]), saved, tmp_path)


def test_spnet_cifar_brings_its_official_clamp_unless_optim_sets_one():
    """method=spnet_cifar carries train_cifar.py's element-wise clamp (0.5) wherever it trains; an explicit
    optim.grad_clamp wins; other methods get none."""
    from spnet_dist.engine.setup import with_method_clamp

    def clamp(*over):
        cfg = compose(["model=resnet32_cifar", *over])
        return with_method_clamp(cfg.optim, cfg.method).get("grad_clamp")

    assert clamp("method=spnet_cifar") == 0.5
    assert clamp("method=spnet_cifar", "optim.grad_clamp=2.0") == 2.0
    assert clamp("method=aig") is None
