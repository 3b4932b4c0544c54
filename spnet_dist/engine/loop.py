"""The training loop: a short ``run_step`` and hooks around it (detectron2's ``TrainerBase``).

Everything else — LR clock, evaluation cadence, checkpoints, tracking, the progress bar, the teacher sync check,
preemption, test failpoints, PreciseBN — is a hook (``engine/hooks.py``, ``engine/precise_bn.py``, …).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from .. import distributed as D
from ..errors import SpnetError
from . import preempt
from .hook import Hook, StepResult
from .phase_params import excluded_from_step

log = logging.getLogger("spnet.train")


@dataclass
class Progress:
    epoch: int = 0           # completed epochs
    step: int = 0            # optimizer steps in total
    batch_in_epoch: int = 0  # optimizer steps done in the current epoch
    run_id: str | None = None


class NonFiniteLossError(SpnetError):
    """The loss, or the weights about to be saved, became NaN or infinite."""


def step_flags(loss: torch.Tensor) -> tuple[bool, bool]:
    """(loss finite on every rank, a stop signal reached some rank): one collective and the step's one host sync."""
    bad = (~torch.isfinite(loss.detach())).any().to(device=D.comm_device(), dtype=torch.float32)
    stop = torch.tensor(float(preempt.requested_signal() is not None), device=D.comm_device())
    flags = torch.stack([bad, stop])
    if D.multi_rank():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_bad, any_stop = flags.tolist()
    return any_bad == 0.0, any_stop > 0.0


def last_good(last_ckpt: Path | None) -> str:
    return f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"


class TrainLoop:
    """One rank's training run. ``run()`` trains to ``trainer.epochs`` / ``trainer.max_steps`` or a stop signal;
    hooks read and write the shared state below (progress, last checkpoint, last metrics, logged scalars)."""

    def __init__(self, cfg: Any, engine: Any, method: Any, table: Any, train_loader: Any, val_loader: Any,
                 progress: Progress, tracker: Any, hooks: Sequence[Hook], last_ckpt: Path | None = None,
                 train_batches: Callable[[int], Iterable] | None = None) -> None:
        self.cfg, self.engine, self.method, self.table = cfg, engine, method, table
        self.train_loader, self.val_loader = train_loader, val_loader
        self.train_batches = train_batches  # a fresh pass over this rank's training shard (seed) -> batches
        self.progress, self.tracker, self.hooks = progress, tracker, list(hooks)
        self.rank, self.world = D.rank(), D.world_size()
        self.steps_per_epoch = len(train_loader)
        self.epochs = int(cfg.trainer.epochs)
        max_steps = cfg.trainer.max_steps
        self.max_steps = max_steps if max_steps and max_steps > 0 else math.inf
        self.last_ckpt = last_ckpt
        self.metrics: dict[str, Any] = {}   # the last evaluation
        self.logged: dict[str, float] = {}  # the last logged scalars (train/…)
        self.images_seen = 0
        self.config_changes: list[tuple[str, Any, Any]] = []  # safe settings changed at this resume (key, old, new)
        self.stop = False                   # a stop signal reached some rank: save and leave
        self.preempted = False
        self.report: dict[str, Any] = {}    # extra keys of the final summary, set by hooks (e.g. best_checkpoint)
        cl = cfg.trainer.get("channels_last")
        self.memory_format = (torch.channels_last if (torch.cuda.is_available() if cl is None else bool(cl))
                              else torch.contiguous_format)
        # deepspeed.bf16_autocast: the engine autocasts the student forward; the method's teacher forward and
        # losses run under the same autocast
        self.amp = (functools.partial(torch.autocast, "cuda" if torch.cuda.is_available() else "cpu",
                                      dtype=torch.bfloat16) if cfg.deepspeed.bf16_autocast else contextlib.nullcontext)

    # ------------------------------------------------------------------------------------------- the step
    def run_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Forward, method loss, flags (finite loss, stop signal), backward, optimizer step."""
        engine, prog = self.engine, self.progress
        images = images.to(engine.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(engine.device, non_blocking=True)
        out = engine(images)
        with self.amp():
            loss, terms = self.method.loss(engine.module, images, labels, out)
        for hook in self.hooks:
            loss = hook.after_loss(self, loss)
        finite, stop = step_flags(loss)  # a signal arriving after this is seen at the next step
        if finite:
            engine.backward(loss)
        else:
            self.on_nonfinite(prog.step + 1, loss, terms)
        prog.step += 1
        prog.batch_in_epoch += 1
        if finite:  # parameters outside the method's current phase are left out of the step (phase_params.py)
            with excluded_from_step(engine, self.method.inactive_parameters()):
                engine.step()
        return StepResult(loss.detach(), terms, finite, stop, images.shape[0] * self.world)

    def on_nonfinite(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Stop (default) or skip the optimizer update for a non-finite loss; nothing is saved from a bad state."""
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items() if v.ndim == 0)
        if self.cfg.trainer.on_nonfinite == "skip":
            log.warning(
                "non-finite loss at step %d (%s; loss=%s): optimizer update skipped (trainer.on_nonfinite=skip)",
                step, shown, float(loss))
            return
        raise NonFiniteLossError(
            f"non-finite loss at step {step} on at least one rank (loss={float(loss)}; terms: {shown}); "
            f"{last_good(self.last_ckpt)} (not overwritten). Resume from it with resume=auto after lowering "
            f"optim.lr or enabling deepspeed.gradient_clipping, or set trainer.on_nonfinite=skip to skip such steps")

    # ------------------------------------------------------------------------------------------- the run
    def run(self) -> None:
        """Train (see the class docstring); an exception fires ``on_failure`` on every hook, then propagates."""
        try:
            self._run()
        except BaseException as err:
            for hook in reversed(self.hooks):
                try:
                    hook.on_failure(self, err)
                except Exception as inner:  # noqa: BLE001 - the first error is the one to report
                    log.warning("hook %s could not record the failure: %s", type(hook).__name__, inner)
            raise

    def _run(self) -> None:
        t_start = time.perf_counter()
        self.fire("before_train")
        while not self.stop:
            if self.progress.batch_in_epoch >= self.steps_per_epoch:
                self.progress.epoch += 1
                self.progress.batch_in_epoch = 0
                self.fire("after_epoch")
            if self.stop or self.progress.epoch >= self.epochs or self.progress.step >= self.max_steps:
                break
            self.train_epoch()
        self.preempted = self.stop
        self.elapsed = time.perf_counter() - t_start
        self.fire("after_train")

    def train_epoch(self) -> None:
        """Train until the loader's epoch ends, max_steps, or a stop signal."""
        self.method.on_epoch_start(self.progress.epoch)
        self.engine.train()
        self.fire("before_epoch")
        for images, labels in self.train_loader:  # a restored loader yields only the rest of its epoch
            result = self.run_step(images, labels)
            self.images_seen += result.images
            self.stop = result.stop
            self.fire("after_step", result)
            if self.stop or self.progress.step >= self.max_steps:
                break

    def evaluate(self) -> dict[str, Any]:
        """Validate the method's evaluation model (hooks run before and after); the result is ``self.metrics``."""
        self.fire("before_eval")
        D.average_buffers(self.engine.module)  # one set of BN statistics on every rank
        self.metrics = self.method.evaluate(self.method.eval_model(self.engine.module), self.val_loader, self.table,
                                            self.cfg.eval.execution)
        self.fire("after_eval", self.metrics)
        return self.metrics

    def fire(self, event: str, *args: Any) -> None:
        """Call ``event`` on every hook in order (``after_train`` in reverse order, as a stack unwinds)."""
        for hook in (reversed(self.hooks) if event == "after_train" else self.hooks):
            getattr(hook, event)(self, *args)

    # ------------------------------------------------------------------------------------------- state
    def hook_states(self) -> dict[str, Any]:
        return {h.name: h.state_dict() for h in self.hooks if h.name}

    def load_hook_states(self, states: dict[str, Any] | None) -> None:
        for h in self.hooks:
            if h.name and states and h.name in states:
                h.load_state_dict(states[h.name])

    def summary(self) -> dict[str, Any]:
        cfg, prog = self.cfg, self.progress
        return {**self.metrics, "checkpoint": str(self.last_ckpt) if self.last_ckpt else None, **self.report,
                "mlflow_run_id": prog.run_id, "steps": prog.step, "epochs": prog.epoch, "world_size": self.world,
                "preempted": self.preempted,
                "train_images_per_sec": self.images_seen / self.elapsed if self.elapsed > 0 else 0.0,
                "method": str(cfg.method.name), "model": str(cfg.model.name), "tracking_uri": str(cfg.tracking.uri)}
