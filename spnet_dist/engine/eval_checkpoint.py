"""`spnet eval checkpoint=<path> [key=value ...]`: evaluate a saved DeepSpeed checkpoint on one process."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from .checkpoint import CLIENT_KEY, COMPLETE, complete_tags, problem_with

MODEL_FILE = "mp_rank_00_model_states.pt"


def find_model_file(path: str | Path) -> Path:
    """Accept a tag folder, a checkpoint dir (newest complete tag) or the model-states file itself."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / MODEL_FILE).is_file():
        return p / MODEL_FILE
    tags = complete_tags(p)
    if tags and (p / tags[-1] / MODEL_FILE).is_file():
        return p / tags[-1] / MODEL_FILE
    raise FileNotFoundError(f"checkpoint={str(p)!r}: no {MODEL_FILE} there; pass a checkpoint tag folder "
                            f"(e.g. outputs/checkpoints/global_step90) or a checkpoint.dir with complete tags")


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The model-states file's content, after checking its tag against the completion marker (sizes and
    SHA-256) when the file lies in a tag folder with one."""
    f = find_model_file(path)
    if (f.parent / COMPLETE).is_file():
        reason = problem_with(f.parent.parent, f.parent.name)
        if reason:
            raise ValueError(f"checkpoint {f.parent} is damaged: {reason}; pick another tag in its checkpoint.dir")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is an unreadable checkpoint
        raise ValueError(f"checkpoint file {f} is unreadable ({type(err).__name__}: {err}); it may be truncated "
                         f"or from another program — pick another tag in its checkpoint.dir") from None


def with_new_run_keys(cfg: Any) -> Any:
    """A checkpoint's config with the ``data.*`` / ``eval.*`` keys added since it was written, at their defaults
    (so that today's overrides of them apply to an older checkpoint)."""
    from ..config.compose import compose

    defaults = compose([])
    for section in ("data", "eval"):
        missing = {k: v for k, v in defaults[section].items() if k not in cfg.get(section, {})}
        if missing:
            cfg = OmegaConf.merge(cfg, {section: missing})
    return cfg


def eval_checkpoint(overrides: Sequence[str]) -> dict[str, Any]:
    from ..data.loader import build_loader
    from ..data.preflight import plan_data
    from ..methods import build_method
    from ..methods.build import build_from_config
    from ..models import cost_table

    rest = [o for o in overrides if not o.startswith("checkpoint=")]
    paths = [o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint=")]
    if not paths:
        raise ValueError("spnet eval needs checkpoint=<path to a checkpoint tag folder>")
    state = load_checkpoint_file(paths[0])
    cfg = with_new_run_keys(OmegaConf.create(state[CLIENT_KEY]["config"]))
    OmegaConf.set_struct(cfg, True)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    model, method_cfg = build_from_config(cfg.model, cfg.method, pretrained=False)  # weights: the checkpoint's
    model.load_state_dict(state["module"])
    if torch.cuda.is_available():  # evaluate where the loader's GPU-decoded batches are
        model = model.cuda().to(memory_format=torch.channels_last)
    method = build_method(method_cfg, model)
    method.load_state_dict(state[CLIENT_KEY]["method"])
    offsets = (state[CLIENT_KEY].get("hooks") or {}).get("gate_calibration", {}).get("offsets")
    if offsets:  # the run evaluated with calibrated gates (eval.gate_calibration_batches)
        from .gate_calibration import set_offsets

        set_offsets(model, offsets)
    plan = plan_data(cfg, world=1, for_training=False)  # the data checks, once; the loader reads its file lists
    loader = build_loader(cfg, plan, train=False, shard_id=0, num_shards=1)
    metrics = method.evaluate(method.eval_model(model), loader, cost_table(model, cfg.data.image_size), cfg.eval.execution)
    progress = state[CLIENT_KEY]["progress"]
    return {**metrics, "checkpoint": str(find_model_file(paths[0]).parent), "steps": progress["step"],
            "mlflow_run_id": progress["run_id"], "method": str(cfg.method.name),
            "model": str(cfg.model.name), "execution": str(cfg.eval.execution)}
