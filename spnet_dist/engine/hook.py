"""The hook interface of the training loop (detectron2's ``HookBase``): one class per concern, each owning its state.

The loop calls every hook, in list order, at these points::

    before_train                       after the restore, before the first step (loaders exist)
    before_epoch                       before every (possibly resumed) epoch's first step
    after_loss(loss) -> loss           between the method loss and the step flags (test failpoints only)
    after_step(result)                 after every optimizer step (or skipped non-finite step)
    before_eval / after_eval(metrics)  around every evaluation (``TrainLoop.evaluate``)
    after_save(path)                   after every checkpoint
    after_epoch                        after an epoch's last step (``progress.epoch`` already counts it)
    after_train                        once at the end, also after a stop signal (``loop.preempted``); in reverse order
    on_failure(error)                  instead of after_train when the run ends in an exception; in reverse order;
                                       local work only (another rank may be gone: no collectives)

A hook with state that must survive a restart returns it from ``state_dict`` (the checkpoint stores it under the
hook's ``name``) and takes it back in ``load_state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .loop import TrainLoop


@dataclass
class StepResult:
    """What one ``run_step`` did: the loss and its detached terms, whether the update was applied (finite loss on
    every rank), whether a stop signal reached some rank, and the global number of images of the step."""

    loss: "torch.Tensor"
    terms: dict[str, "torch.Tensor"]
    finite: bool
    stop: bool
    images: int


class Hook:
    """No-op defaults for every call point; subclasses override what they need."""

    name: str = ""  # key of this hook's state in the checkpoint ("" = no state)

    def before_train(self, loop: "TrainLoop") -> None:
        pass

    def before_epoch(self, loop: "TrainLoop") -> None:
        pass

    def after_loss(self, loop: "TrainLoop", loss: "torch.Tensor") -> "torch.Tensor":
        return loss

    def after_step(self, loop: "TrainLoop", result: StepResult) -> None:
        pass

    def before_eval(self, loop: "TrainLoop") -> None:
        pass

    def after_eval(self, loop: "TrainLoop", metrics: dict[str, Any]) -> None:
        pass

    def after_save(self, loop: "TrainLoop", path: Any) -> None:
        pass

    def after_epoch(self, loop: "TrainLoop") -> None:
        pass

    def after_train(self, loop: "TrainLoop") -> None:
        pass

    def on_failure(self, loop: "TrainLoop", error: BaseException) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
