"""Config mistakes fail before any work with ONE line naming the key, the bad value and the choices; secrets
never reach printed configs or error messages. Runs the real CLI entry in-process (spnet_dist.cli.main)."""
from __future__ import annotations

import contextlib
import io
import os
import re

import pytest
import yaml
from conftest import run_spnet
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from spnet_dist.cli import main
from spnet_dist.config import ConfigError, compose, config_dir, redact
from spnet_dist.config.schema import schema
from spnet_dist.preflight import job_yaml, preflight

SECRET = "s3cr3t-Pa55word-xyz"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def one_error(*overrides: str) -> str:
    rc, out, err = cli("train", "--cfg", "job", *overrides)
    assert rc == 2 and out == "", (rc, out, err)
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("spnet train: config error: ")
    return err[len("spnet train: config error: "):].rstrip("\n")


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)


def test_good_overrides_print_the_config():
    rc, out, err = cli("train", "--cfg", "job", "method=spnet_code", "deepspeed=zero2", "trainer.batch_size=7",
                       "optim.lr=1", "data.on_corrupt=fail", "data.scan=decode", "+optim.no_decay_bn=true")
    assert (rc, err) == (0, "")
    cfg = yaml.safe_load(out)
    assert cfg["trainer"]["batch_size"] == 7 and cfg["deepspeed"]["stage"] == 2 and cfg["method"]["name"] == "spnet"
    assert cfg["data"]["on_corrupt"] == "fail" and cfg["optim"]["no_decay_bn"] is True


@pytest.mark.parametrize("overrides, message", [
    (["trainer.batch_sise=7"],
     "unknown key 'trainer.batch_sise' (from 'trainer.batch_sise=7'); did you mean trainer.batch_size? Keys under "
     "'trainer': "),
    (["+trainer.batch_sise=7"], "unknown key 'trainer.batch_sise' (from '+trainer.batch_sise=7'); did you mean "),
    (["model=resnet51"],
     "model=resnet51: no such option in group 'model'; choose one of resnet101, resnet110_cifar, resnet32_cifar, "
     "resnet50, resnet_tiny"),
    (["deepspeed=zero3"], "deepspeed=zero3: no such option in group 'deepspeed'; choose one of zero0, zero1, zero2"),
    (["deepspeed.stage=3"],
     "deepspeed.stage=3 is not valid; choose one of 0, 1, 2 (ZeRO stage 3 is not available; "
     "deepspeed=zero0|zero1|zero2 set it)"),
    (["trainer.batch_size=abc"], "trainer.batch_size='abc' is not an integer"),
    (["trainer.batch_size=1.5"], "trainer.batch_size=1.5 is not an integer"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is out of range; it must be >= 1"),
    (["trainer.epochs=null"], "trainer.epochs=null is not valid; give an integer"),
    (["optim.lr=fast"], "optim.lr='fast' is not a number"),
    (["trainer.progress=maybe"], "trainer.progress='maybe' is not true or false"),
    (["model.layers=abc"], "model.layers='abc' is not a list, e.g. [1, 2]"),
    (["data.decode=gpu"], "data.decode='gpu' is not valid; choose one of auto, cpu, mixed"),
    (["data.on_corrupt=ignore"], "data.on_corrupt='ignore' is not valid; choose one of skip, fail"),
    (["eval.execution=sparse"], "eval.execution='sparse' is not valid; choose one of dense, skip"),
    (["data.val_resize=40"],
     "data.val_resize=40 is smaller than data.image_size=64: the val center crop would not fit; use "
     "data.val_resize>=64 (ImageNet: 256 for 224)"),
    (["trainer=3"], "trainer=3 is not valid: 'trainer' is a group of keys ("),
    (["~model"], "model is missing (removed with '~model'?); choose one of model=resnet101, "),
    (["trainer.batch_size"], "cannot parse override 'trainer.batch_size': missing EQUAL at '<EOF>'; write "
                             "key=value or group=option"),
    (["model.layers=[1,2"], "cannot parse override 'model.layers=[1,2': no viable alternative at input '[1,2'"),
    (["modle=resnet50"], "unknown key 'modle' (from 'modle=resnet50'); did you mean model? Top-level keys: "),
    (["method=spnet_code", "model=resnet32_cifar"],
     "method.head_weights has 4 entries but model=resnet32_cifar has 3 stages, hence 3 heads: give 3 weights "),
    (["tracking.uri=${oc.env:SPNET_NO_SUCH_VAR}"],
     "tracking.uri=${oc.env:SPNET_NO_SUCH_VAR}: cannot resolve the interpolation: "),
])
def test_one_line_naming_key_value_and_choices(overrides, message):
    assert one_error(*overrides).startswith(message)


@pytest.mark.parametrize("override, message", [
    (f"+tracking.password={SECRET}", "tracking.password: secrets do not belong in the config"),
    (f"tracking.password={SECRET}", "tracking.password: secrets do not belong in the config"),
    ("name=${oc.env:MLFLOW_TRACKING_PASSWORD}",
     "name reads the secret environment variable MLFLOW_TRACKING_PASSWORD into the config"),
    (f"tracking.uri=https://bob:{SECRET}@mlflow.example.org",
     "tracking.uri holds a password inside a URI (https://bob:***@mlflow.example.org); use the URI without it and "
     "export MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"),
    (f"name=run-{SECRET}", "name contains the value of the secret environment variable MLFLOW_TRACKING_PASSWORD"),
])
def test_secrets_are_refused_and_never_echoed(override, message):
    msg = one_error(override)
    assert msg.startswith(message) and SECRET not in msg


def test_redact_masks_secret_keys_uri_passwords_and_env_values(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-42")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "AKIAxyz")
    monkeypatch.setenv("HOME_DIR_TOKENISH", "")  # empty values are no secret
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a flag, not a secret
    params = {"tracking.uri": "http://u:hunter2@host:5000", "tracking.password": "hunter2", "trainer.batch_size": 8,
              "name": f"run-{SECRET}", "notes": ["tok-42", "ok"], "aws": {"AWS_SECRET_ACCESS_KEY": "AKIAxyz"},
              "api_key": None, "flag": "false"}
    assert redact(params) == {"tracking.uri": "http://u:***@host:5000", "tracking.password": "***",
                              "trainer.batch_size": 8, "name": "run-***", "notes": ["***", "ok"],
                              "aws": {"AWS_SECRET_ACCESS_KEY": "***"}, "api_key": None, "flag": "false"}
    assert params["tracking.password"] == "hunter2"  # a copy


@pytest.mark.parametrize("secret, override, refused", [
    ("tk42", "name=tk42", True), ("tk42", "name=run-tk42", True), ("tk42", "name=runtk42x", True),
    ("hunter2", "name=hunter2", True), ("hunter2", "tracking.experiment=exp_hunter2", True),
    ("tk42", "+tracking.tags=[a,tk42]", True),  # strings inside lists too
    ("ab", "name=ab", True), ("ab", "name=run-ab", True), ("ab", "name=lab", False),  # tiny: whole words only
    ("1", "name=1", False), ("", "name=x", False), ("false", "name=false", False),  # no secrets: digits, empty, flags
])
def test_short_secrets_are_refused_in_every_free_text_value(monkeypatch, secret, override, refused):
    """The value rule holds whatever the secret's length (it used to skip values under 8 characters, so
    name=<short token> reached the MLflow run name and the checkpoint's config in clear)."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    if not refused:
        assert cli("train", "--cfg", "job", override)[0] == 0
        return
    msg = one_error(override)
    assert msg == (f"{override.split('=')[0].lstrip('+')} contains the value of the secret environment variable "
                   f"MLFLOW_TRACKING_TOKEN; do not copy secrets into the config (it is printed, logged and saved)")


def test_a_short_secret_as_run_name_stops_train_before_any_work(tiny_data, tmp_path):
    proc = run_spnet("train", f"data.root={tiny_data}", f"checkpoint.dir={tmp_path / 'ckpt'}", "name=hunter2",
                     cwd=tmp_path, check=False, env={"MLFLOW_TRACKING_PASSWORD": "hunter2"})
    assert proc.returncode == 2 and proc.stdout == "" and "hunter2" not in proc.stderr
    assert proc.stderr.splitlines() == ["spnet train: config error: name contains the value of the secret "
                                        "environment variable MLFLOW_TRACKING_PASSWORD; do not copy secrets into "
                                        "the config (it is printed, logged and saved)"]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, line", [
    (["--port", "70000"], "spnet ui: config error: --port 70000 is not a TCP port; choose one between 1 and 65535, "
                          "e.g. --port 5000"),
    (["--port", "0"], "spnet ui: config error: --port 0 is not a TCP port; choose one between 1 and 65535, "
                      "e.g. --port 5000"),
    (["tracking.ui.port=65536"], "spnet ui: config error: tracking.ui.port=65536 is not a TCP port; choose one "
                                 "between 1 and 65535, e.g. tracking.ui.port=5000"),
])
def test_spnet_ui_with_a_port_out_of_range_is_one_line(tmp_path, args, line):
    proc = run_spnet("ui", f"--uri=sqlite:///{tmp_path / 'mlflow.db'}", *args, cwd=tmp_path, check=False,
                     timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.splitlines() == [line], proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_preflight_checks_this_machine_and_required_values(monkeypatch, tmp_path):
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=rf"^trainer.nprocs={cores + 1} is more than the {cores} CPU cores available "
                                          rf"here; choose trainer.nprocs between 1 and {cores}$"):
        preflight(compose([f"trainer.nprocs={cores + 1}"]), data=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "64")
    preflight(compose([f"trainer.nprocs={cores + 1}"]), data=False)  # under a launcher nprocs is not used
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match=r"^data.root is required and has no default: add data.root=<value>"):
        preflight(compose(["data=imagenet", "model=resnet50"]), data=False)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^data.decode=mixed needs a CUDA GPU, but this machine has none; "
                                              r"choose one of auto, cpu"):
            preflight(compose(["data.decode=mixed"]), data=False)


def test_machine_errors_through_the_cli_are_one_line(tiny_data, tmp_path):
    cores = len(os.sched_getaffinity(0))
    proc = run_spnet("train", f"data.root={tiny_data}", f"trainer.nprocs={cores + 1}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"spnet train: config error: trainer.nprocs={cores + 1} is more than the "
                                        f"{cores} CPU cores available here; choose trainer.nprocs between 1 and "
                                        f"{cores}"]


# ------------------------------------------------------------------------------------- property-based test

_S = schema(str(config_dir()))
KEYS = sorted(_S.leaves) + ["trainer.batch_sise", "foo", "tracking.password", "data", "model", "hydra.run.dir",
                            "trainer.sync_check_every", "optim.no_decay_bn", "a.b.c", "x/y", ""]
GROUPS = sorted(_S.groups) + ["hydra/launcher", "nope"]
OPTIONS = sorted({o for opts in _S.groups.values() for o in opts}) + ["nope", "zero3", ""]
VALUES = st.one_of(
    st.integers(-3, 10**9).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["null", "true", "false", "abc", "", "[1,2]", "[", "]", "{}", "{a: 1}", "'quoted'", "auto",
                     "mixed", "cpu", "skip", "fail", "decode", "off", "v1.5", "0", "1", "2", "3", "-1", "1e9",
                     "${oc.env:HOME}", "${oc.env:SPNET_NOPE}", "${seed}", "${trainer.batch_size}", "${",
                     "${oc.env:MLFLOW_TRACKING_PASSWORD}", f"x{SECRET}", "http://u:p4ss@h:1", "a b", "a=b",
                     "\\", "'", "\""]),
    st.text(max_size=8),
)


def _plausible() -> list[str]:
    """key=value for every leaf of the default config, with its own default value (these alone validate)."""
    from omegaconf import OmegaConf

    from spnet_dist.config import flatten

    out = []
    for k, v in flatten(OmegaConf.to_container(compose([]), resolve=True)).items():
        if isinstance(v, bool) or v is None:
            text = "null" if v is None else str(v).lower()
        elif isinstance(v, (int, float)):
            text = str(v)
        elif isinstance(v, list):
            text = "[" + ",".join(str(x).lower() if isinstance(x, bool) else str(x) for x in v) + "]"
        else:
            text = f"'{v}'" if re.search(r"[^\w./:-]", str(v)) or not v else str(v)
        out.append(f"{k}={text}")
    return out


PLAUSIBLE = _plausible()
GROUP_CHOICES = [f"{g}={o}" for g, opts in _S.groups.items() if g != "cluster" for o in opts]
OVERRIDE = st.one_of(
    st.sampled_from(PLAUSIBLE),
    st.sampled_from(PLAUSIBLE),
    st.sampled_from(GROUP_CHOICES),
    st.builds(lambda pre, k, v: f"{pre}{k}={v}", st.sampled_from(["", "", "", "+", "++", "~"]),
              st.sampled_from(KEYS), VALUES),
    st.builds(lambda g, o: f"{g}={o}", st.sampled_from(GROUPS), st.sampled_from(OPTIONS)),
    st.builds(lambda pre, k: f"{pre}{k}", st.sampled_from(["~", "+", ""]), st.sampled_from(KEYS)),
    st.text(max_size=16),
)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(OVERRIDE, max_size=4))
def test_any_override_validates_or_fails_with_one_line(overrides):
    # (the autouse fixture has set MLFLOW_TRACKING_PASSWORD=SECRET for the whole test)
    rc, out, err = cli("train", "--cfg", "job", "--", *overrides)
    event("validates" if rc == 0 else err.split(":", 2)[-1].split("=")[0].split(" ")[1][:20])
    assert "Traceback" not in err
    assert SECRET not in out and SECRET not in err
    if rc == 0:
        assert err == ""
        assert isinstance(yaml.safe_load(out), dict)
    else:
        assert rc == 2 and out == ""
        assert err.startswith("spnet train: ") and err.endswith("\n") and err.count("\n") == 1, err
