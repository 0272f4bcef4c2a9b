"""What every medx LightningModule shares.

`MedxModule`: the model owns its input and carries its card. Normalisation (ImageNet's or
0.5/0.5, chosen by how the network started) is a buffer applied at the start of `forward`, so
data modules, `medx.predict` and a served model all feed it [0, 1] pixels; the model card
(`card`, saved as `checkpoint["medx"]`) holds what using the model needs: task, class names,
input contract, the training run, and once evaluated its operating point and temperature.

`TransferModule`: a network whose encoder blocks a strategy freezes. Classification and
segmentation differ in their networks, losses and metrics, but freezing, per-group learning
rates, keeping frozen BatchNorm in eval mode and building the optimizer and scheduler are one
mechanism, kept here once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from medx.errors import ConfigError
from medx.models.card import CARD_KEY, InputSpec, ModelCard
from medx.models.schedulers import optimizer_config
from medx.models.strategy import Strategy

log = logging.getLogger(__name__)

Optimizer = Callable[..., torch.optim.Optimizer]
Scheduler = Callable[[torch.optim.Optimizer], Any]


__all__ = ["CARD_KEY", "MedxModule", "TransferModule", "compile_errors", "declared_inputs"]


def declared_inputs(model_target: str) -> str:
    """What batches must carry for the model class `model_target` (a `_target_` path): its
    declared `inputs`, read here only, so training, evaluation and the data modules agree."""
    from hydra.utils import get_class

    return getattr(get_class(model_target), "inputs", "image")


class MedxModule(L.LightningModule):
    """Base of every medx model: input normalisation inside the model, a model card."""

    task: str
    inputs = "image"  # what batches carry: "image", or "features" (the quality baseline)

    def __init__(self) -> None:
        super().__init__()
        self.card: dict[str, Any] = {}

    def use_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Buffers (saved with the weights) that `normalise` applies to [0, 1] images.

        Args:
            mean: per channel (ImageNet's when the network starts from ImageNet or local
                weights, 0.5 otherwise).
            std: per channel, likewise.
        """
        self.register_buffer("input_mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images → the network's input scale."""
        return (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.input_mean.flatten().tolist())

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.input_std.flatten().tolist())

    @property
    def model_card(self) -> ModelCard:
        """`card`, typed (a fresh copy: change `card` to change what is saved)."""
        return ModelCard.from_dict(self.card)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The card as `ModelCard` writes it (schema version, threshold scales, credentials
        redacted), with what the module itself knows: task, inputs, class, normalisation."""
        card = ModelCard.from_dict(self.card)
        card.task, card.inputs = self.task, self.inputs
        card.module = f"{type(self).__module__}.{type(self).__qualname__}"
        card.checkpoint = None  # where one copy was opened from is no property of the model
        if self.inputs == "image":
            card.input = card.input or InputSpec()
            card.input.mean, card.input.std = list(self.mean), list(self.std)
        checkpoint[CARD_KEY] = card.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.card = deepcopy(checkpoint.get(CARD_KEY) or {})


class TransferModule(MedxModule):
    """Base class: call `use_strategy` once the network exists; subclasses own `self.net`."""

    net: nn.Module
    compiled = False  # model.compile=true applied (Lightning calls configure_model every run)

    def use_strategy(
        self,
        strategy: Strategy | dict | None,
        optimizer: Optimizer | None,
        scheduler: Scheduler | None,
        blocks: list[list[str]],
        head: list[str],
        starts_trained: bool,
    ) -> None:
        """Freeze per the strategy; remember the optimizer param groups (after save_hparams).

        Args:
            strategy: `strategy=` of the config (`medx.models.strategy.Strategy` or its dict;
                None: everything trains).
            optimizer: a partial optimizer (`optimizer=`), completed with the param groups in
                `configure_optimizers` (None: AdamW).
            scheduler: a partial LR scheduler (`scheduler=`), or None.
            blocks: the encoder's blocks from the stem up, each a list of module names.
            head: the module names of the new head (always trained).
            starts_trained: the encoder starts from trained weights (`model.pretrained` or
                `model.weights`); freezing a random encoder is warned about.
        """
        strategy = Strategy(**strategy) if isinstance(strategy, dict) else strategy or Strategy()
        self.hparams["strategy"] = asdict(strategy)
        self.strategy = strategy
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.scheduler_factory = scheduler
        self.blocks, self.head = blocks, head
        self._param_groups = strategy.apply(self.net, blocks, head)
        self._strategy_summary = strategy.summary(self.net, blocks)
        if strategy.unfreeze_last is not None and not starts_trained:
            log.warning(
                "strategy=%s freezes backbone blocks, but the backbone is randomly initialised "
                "(model.pretrained=false, no model.weights): frozen blocks stay random.",
                strategy.name,
            )

    def train(self, mode: bool = True) -> TransferModule:
        """Keep frozen blocks in eval mode (BatchNorm statistics frozen too)."""
        super().train(mode)
        if mode:
            for module in Strategy.frozen_modules(self.net):
                module.eval()
        return self

    def configure_model(self) -> None:
        """The fast path, set when a Trainer is about to run the model. On a GPU: channels-last
        memory layout (cuDNN's tensor-core convolutions read it without transposing; inputs
        follow the weights' layout). Fitting with `model.compile=true` (saved in hparams): the
        network compiled in place by `nn.Module.compile`, so checkpoints keep plain parameter
        names; a later `medx.eval` runs eagerly rather than compiling for one pass."""
        trainer = self._trainer
        if trainer is None:
            return
        if isinstance(trainer.accelerator, CUDAAccelerator):
            self.net.to(memory_format=torch.channels_last)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.hparams.get("compile") and fitting and not self.compiled:
            self.net.compile()
            self.compiled = True

    def on_train_epoch_start(self) -> None:
        self.strategy.start_epoch(self.net, self.blocks, self.current_epoch)
        self.train()  # Lightning leaves module modes alone; re-assert the frozen blocks' eval

    def configure_optimizers(self) -> Any:
        log.info("%s", self._strategy_summary)
        optimizer = self.optimizer_factory(self._param_groups)
        for group in optimizer.param_groups:  # the strategy's lower backbone LR
            group["lr"] *= group["lr_scale"]
        return optimizer_config(optimizer, self.scheduler_factory)


@contextmanager
def compile_errors() -> Iterator[None]:
    """torch.compile failing (model.compile=true: no C++ compiler, an operation it cannot
    trace) fails at the first step, deep in Dynamo or Inductor: say which key and the way out."""
    try:
        yield
    except Exception as error:
        if not _is_compile_error(error):
            raise
        raise ConfigError(
            f"model.compile=true: torch.compile could not compile the network "
            f"({type(error).__name__}: {_first_line(error)}). "
            "Set model.compile=false to train without compiling."
        ) from error


def _is_compile_error(error: BaseException) -> bool:
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return False
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return isinstance(error, TorchDynamoException | InductorError)


def _first_line(error: BaseException) -> str:
    """The line that says what went wrong: not a 'backend=... raised:' header, not Dynamo's
    advice on verbose logging."""
    for line in str(error).splitlines():
        line = line.strip()
        if line and not line.endswith(":") and not line.startswith("Set TORCHDYNAMO"):
            return line
    return "no message"
