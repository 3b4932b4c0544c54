"""The training loop's standard hooks, one class per concern (see ``engine/hook.py`` for the call points)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed as D
from ..config import flatten, to_container
from . import preempt
from .checkpoint import Checkpointer
from .hook import Hook, StepResult
from .lr_scale import announce_lr
from .loop import NonFiniteLossError, TrainLoop, last_good
from .rng import rng_state
from .schedule import EpochClock, lr_factor

log = logging.getLogger("spnet.train")


class LRSchedule(Hook):
    """The epoch clock and the LR scheduler: the LR is ``optim.lr`` (scaled by ``optim.lr_reference_batch``, see
    ``lr_scale.py``) x a pure function of fractional epochs (warm-up, milestones), built once the epoch length is
    known, so a resume (on any number of ranks) continues it exactly without saved state."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg: Any) -> None:
        self.optimizer, self.optim_cfg = optimizer, optim_cfg
        self.clock = EpochClock()
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.base_lr = float(optim_cfg.lr)  # optim.lr, scaled by optim.lr_reference_batch in before_train

    def before_train(self, loop: TrainLoop) -> None:
        self.clock.steps_per_epoch = loop.steps_per_epoch
        self._advance(loop)
        optim, per_rank = self.optim_cfg, int(loop.cfg.trainer.batch_size)
        self.base_lr = announce_lr(optim, per_rank * loop.world, per_rank, loop.world, loop.rank)  # lr_scale.py
        for group in self.optimizer.param_groups:  # the config's values, also over a resumed optimizer state
            group["initial_lr"] = self.base_lr * float(group.get("lr_mult", 1.0))  # routers: ×mult
            group["momentum"], group["nesterov"] = float(optim.momentum), bool(optim.nesterov)
            no_decay = bool(optim.get("no_decay_bn", False)) and all(p.ndim <= 1 for p in group["params"])
            group["weight_decay"] = 0.0 if no_decay else float(optim.weight_decay)  # optim.no_decay_bn: 1-D
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.optim_cfg, self.clock))

    def after_step(self, loop: TrainLoop, result: StepResult) -> None:
        self._advance(loop)
        if result.finite:
            self.scheduler.step()

    def _advance(self, loop: TrainLoop) -> None:
        prog = loop.progress
        self.clock.epochs = prog.epoch + prog.batch_in_epoch / loop.steps_per_epoch

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class Tracking(Hook):
    """Starts (or continues) the MLflow run, logs params, per-step scalars, evaluations, checkpoints and the final
    model; marks the run FINISHED, KILLED after a stop signal, FAILED after an exception. Calls the tracker on every rank (it is a no-op
    off rank 0); the scalar average is a collective."""

    def __init__(self, lr: LRSchedule) -> None:
        self.lr = lr

    def before_train(self, loop: TrainLoop) -> None:
        cfg = loop.cfg
        tags = {"method": str(cfg.method.name), "backbone": str(cfg.model.name),
                "target_rate": str(cfg.method.get("target_rate")), "world_size": str(loop.world)}
        loop.progress.run_id = loop.tracker.start(loop.progress.run_id, run_name(cfg), tags)
        loop.tracker.log_params(flatten(to_container(cfg)))  # the tracker masks secrets; the first values stay
        if loop.table is not None:  # the GFLOPs conventions (models.cost): cost.convention, cost.*_layout
            from ..models import cost_params

            loop.tracker.log_params(cost_params(loop.table))
        loop.tracker.log_tags({"spnet.lr_used": f"{self.lr.base_lr:g}"})  # optim.lr after lr_reference_batch
        if loop.config_changes:
            record_changes(loop)


    def after_step(self, loop: TrainLoop, result: StepResult) -> None:
        step = loop.progress.step
        if step % loop.cfg.trainer.log_every == 0:
            loop.logged = global_scalars({"loss": result.loss, **result.terms})
            rates = result.terms.get("block_rates")  # the sampled training gates' global rates, one per block
            if isinstance(rates, torch.Tensor) and rates.ndim == 1:
                from ..tracking.artifacts import rate_rows

                loop.logged.update({f"train/rate/{r['block']}": r["rate"]
                                    for r in rate_rows(rates.tolist(), loop.table)})
            loop.logged["train/lr"] = self.lr.last_lr()
            loop.tracker.log_metrics(loop.logged, step=step, images_seen=loop.images_seen)

    def after_eval(self, loop: TrainLoop, metrics: dict[str, Any]) -> None:
        prog = loop.progress
        loop.tracker.log_eval(metrics, step=prog.step, epoch=prog.epoch, table=loop.table)
        if loop.rank == 0:
            log.info("epoch %d: top1 %.4f, MACs/image %.4g", prog.epoch, metrics["top1"], metrics["macs_per_image"])

    def after_save(self, loop: TrainLoop, path: Path) -> None:
        loop.tracker.log_checkpoint(path, step=loop.progress.step, epoch=loop.progress.epoch)

    def after_train(self, loop: TrainLoop) -> None:
        loop.tracker.log_final(loop.method.eval_model(loop.engine.module), loop.last_ckpt, final=not loop.preempted)
        loop.progress.run_id = loop.tracker.finish("KILLED" if loop.preempted else "FINISHED") or loop.progress.run_id

    def on_failure(self, loop: TrainLoop, error: BaseException) -> None:
        """The run ends in an exception: FAILED (KILLED for Ctrl-C), never left RUNNING; a requeued job or a
        ``resume=auto`` reopens the same run."""
        loop.tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def record_changes(loop: TrainLoop) -> None:
    """Settings changed at a resume: one line, and in MLflow (whose params cannot change) the new values as
    params ``resumed/step<N>/<key>`` plus a tag listing every change with its step."""
    from .resume_config import show

    step, changes = loop.progress.step, loop.config_changes
    if loop.rank == 0:
        log.warning("resume at step %d with changed settings, in force from this step on: %s", step, show(changes))
    loop.tracker.log_params({f"resumed/step{step}/{k}": new for k, _, new in changes})
    loop.tracker.log_tags({f"spnet.config_changes.step{step}": show(changes)[:5000]})


class Evaluation(Hook):
    """Evaluates every ``eval.every_epochs`` epochs and after the last one; once more at the end when a run stopped
    mid-epoch (max_steps) or resumed an already finished run."""

    def after_epoch(self, loop: TrainLoop) -> None:
        epoch = loop.progress.epoch
        if epoch % loop.cfg.eval.every_epochs == 0 or epoch >= loop.epochs:
            loop.evaluate()

    def after_train(self, loop: TrainLoop) -> None:
        if not loop.metrics and not loop.preempted:
            loop.evaluate()


class Checkpointing(Hook):
    """Saves every ``checkpoint.every_steps`` steps, at a stop signal, after every epoch and at the end; owns the
    client state: progress, method state, every hook's state, every rank's RNG streams and loader position, and
    the resolved config. Refuses to save non-finite weights (the previous checkpoint stays the last good one)."""

    def __init__(self, ckpt: Checkpointer) -> None:
        self.ckpt = ckpt

    def after_step(self, loop: TrainLoop, result: StepResult) -> None:
        every = loop.cfg.checkpoint.every_steps
        if result.stop or (every and loop.progress.step % every == 0):
            self.save(loop)

    def after_epoch(self, loop: TrainLoop) -> None:
        self.save_unless_saved(loop)

    def after_train(self, loop: TrainLoop) -> None:
        if not loop.preempted:
            self.save_unless_saved(loop)  # stopped mid-epoch by max_steps

    def save_unless_saved(self, loop: TrainLoop) -> None:
        if loop.last_ckpt is None or loop.last_ckpt.name != f"global_step{loop.progress.step}":
            self.save(loop)

    def save(self, loop: TrainLoop) -> Path:
        check_finite_state(loop.engine.module, loop.method, loop.progress.step, loop.last_ckpt)
        D.average_buffers(loop.engine.module)  # one set of BN statistics, whichever rank's file is read
        state = {"progress": asdict(loop.progress), "method": loop.method.state_dict(),
                 "hooks": loop.hook_states(), "rng": D.gather_objects(rng_state()),
                 "data": D.gather_objects(loop.train_loader.state_dict()), "config": to_container(loop.cfg)}
        loop.last_ckpt = self.ckpt.save(loop.engine, loop.progress.step, state)
        loop.fire("after_save", loop.last_ckpt)
        return loop.last_ckpt


class ProgressBar(Hook):
    """tqdm bar on rank 0 with the logged loss and execution rate (no extra host sync per step)."""

    def __init__(self) -> None:
        self.bar = None

    def before_epoch(self, loop: TrainLoop) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=loop.steps_per_epoch, initial=loop.progress.batch_in_epoch, leave=False,
                        desc=f"epoch {loop.progress.epoch + 1}/{loop.epochs}", dynamic_ncols=True, mininterval=1.0)

    def after_step(self, loop: TrainLoop, result: StepResult) -> None:
        if loop.progress.step % loop.cfg.trainer.log_every == 0:
            self.bar.set_postfix(loss=f"{loop.logged['train/loss']:.3f}",
                                 rate=f"{loop.logged.get('train/exec_rate', float('nan')):.2f}")
        self.bar.update(1)

    def after_epoch(self, loop: TrainLoop) -> None:
        self.close()

    def after_train(self, loop: TrainLoop) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TeacherSyncCheck(Hook):
    """Every ``trainer.sync_check_every`` steps the ranks compare checksums of the method's replicated state
    (SP-Net's EMA teacher) and stop with a clear error if it drifted."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self, loop: TrainLoop, result: StepResult) -> None:
        if loop.progress.step % self.every == 0:
            check_in_sync(loop.method, loop.progress.step)


class Preemption(Hook):
    """Between epochs every rank learns whether any rank got a stop signal (within an epoch the step flags carry
    it); at the end the stop is announced with the checkpoint that was written."""

    def after_epoch(self, loop: TrainLoop) -> None:
        loop.stop = preempt.should_stop()

    def after_train(self, loop: TrainLoop) -> None:
        if loop.preempted and loop.rank == 0:
            log.warning("stop signal %s: checkpoint %s written at step %d; exiting with code %d (resume=auto "
                        "continues)", preempt.requested_signal(), loop.last_ckpt, loop.progress.step,
                        preempt.EXIT_PREEMPTED)


# ------------------------------------------------------------------------------------------------- helpers
def run_name(cfg: Any) -> str:
    """``name``, else <method>-<model>-t<target_rate> (without the target for methods that have none: static)."""
    target = cfg.method.get("target_rate")
    return cfg.name or f"{cfg.method.name}-{cfg.model.name}" + (f"-t{target}" if target is not None else "")


def global_scalars(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar loss terms averaged over ranks (collective), as ``train/<name>`` floats for logging."""
    names = [k for k, v in terms.items() if v.ndim == 0]
    values = torch.stack([terms[k].detach().double().to(D.comm_device()) for k in names])
    if D.multi_rank():
        dist.all_reduce(values)
        values /= D.world_size()
    return {f"train/{k}": float(v) for k, v in zip(names, values.tolist())}


def state_checksum(state: Any) -> torch.Tensor:
    """Sum and sum of squares of every tensor in a nested state, in float64."""
    parts: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            parts.append(torch.stack([x.double().sum(), x.double().square().sum()]))
        elif isinstance(x, dict):
            for k in sorted(x):
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(state)
    return torch.cat(parts) if parts else torch.zeros(2, dtype=torch.float64)


def check_in_sync(method: Any, step: int) -> None:
    """Stop with a clear error if replicated method state (SP-Net's EMA teacher) differs between ranks."""
    if not D.multi_rank():
        return
    mine = state_checksum(method.replicated_tensors()).to(D.comm_device())
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    bad = torch.tensor([0.0 if torch.equal(mine, ref) else 1.0], device=D.comm_device())
    dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(f"method state (e.g. the EMA teacher) differs between ranks at step {step}: "
                           f"{int(bad.item())} rank(s) drifted from rank 0. The run cannot continue consistently; "
                           "resume from the last checkpoint (resume=auto).")


def check_finite_state(model: torch.nn.Module, method: Any, step: int, last_ckpt: Path | None) -> None:
    """Refuse to checkpoint NaN/inf weights (a NaN gradient with a finite loss gets past the loss check): the
    previous checkpoint and ``latest`` stay as they are. One fused norm per tensor list, once per save."""
    for what, tensors in (("model weights", list(model.parameters())),
                          ("method state (e.g. the EMA teacher)", list(method.replicated_tensors()))):
        floating = [t for t in tensors if t.is_floating_point()]
        if floating and not bool(torch.isfinite(torch.stack(torch._foreach_norm(floating))).all()):
            raise NonFiniteLossError(
                f"non-finite {what} at step {step} (a gradient was NaN or infinite although the loss was finite); "
                f"checkpoint not written, {last_good(last_ckpt)} (not overwritten). Resume from it with "
                f"resume=auto after lowering optim.lr or enabling deepspeed.gradient_clipping")


def standard_hooks(cfg: Any, optimizer: torch.optim.Optimizer, ckpt: Checkpointer) -> list[Hook]:
    """The hooks every run has, in call order: tracking logs a step before it is checkpointed; evaluation runs
    before the epoch's checkpoint (which then holds what was evaluated, e.g. PreciseBN statistics). ``after_train``
    runs in reverse order: final checkpoint, final evaluation, then the tracker closes the run."""
    from .best import BestCheckpoint
    from .failpoints import Failpoints
    from .gate_calibration import GateCalibration
    from .precise_bn import PreciseBN

    failpoints = Failpoints.from_env()  # first: a NaN injected after an update is seen by that step's save
    lr = LRSchedule(optimizer, cfg.optim)
    hooks: list[Hook] = [*([failpoints] if failpoints else []), lr, Preemption(), Tracking(lr)]
    if int(cfg.eval.get("precise_bn_batches", 0) or 0) > 0:
        hooks.append(PreciseBN(int(cfg.eval.precise_bn_batches)))
    if int(cfg.eval.get("gate_calibration_batches", 0) or 0) > 0:
        hooks.append(GateCalibration(int(cfg.eval.gate_calibration_batches),
                                     str(cfg.eval.get("gate_calibration_transform", "eval"))))
    hooks += [BestCheckpoint(ckpt), Evaluation(), Checkpointing(ckpt)]  # best: its after_train after the last eval
    if D.rank() == 0 and cfg.trainer.progress:
        hooks.append(ProgressBar())
    if int(cfg.trainer.get("sync_check_every") or 0):
        hooks.append(TeacherSyncCheck(int(cfg.trainer.sync_check_every)))
    return hooks
