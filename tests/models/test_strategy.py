"""Strategies decide what trains: checked on real weights after real Trainer steps."""

from __future__ import annotations

import logging

import lightning as L
import torch

from medx.data.folders import PhantomDataModule
from medx.models.classifier import ClassificationModule, inverse_frequency_weights
from medx.models.strategy import Strategy


def _fit(strategy: Strategy, phantom_cache) -> tuple[ClassificationModule, dict, dict]:
    model = ClassificationModule("test_resnet", num_classes=2, strategy=strategy)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    data = PhantomDataModule(
        phantom_cache, n_patients=60, image_size=64, batch_size=16, num_workers=0
    )
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=data)
    return model, before, model.net.state_dict()


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_freeze_leaves_every_backbone_tensor_unchanged(phantom_cache):
    model, before, after = _fit(Strategy("freeze", unfreeze_last=0), phantom_cache)

    # parameters AND BatchNorm running statistics: only the head moves
    assert _changed(before, after) == set(model.head)


def test_finetune_changes_only_the_last_blocks(phantom_cache):
    model, before, after = _fit(
        Strategy("finetune", unfreeze_last=1, backbone_lr_scale=0.1), phantom_cache
    )

    changed = _changed(before, after)
    last = model.blocks[-1][0].split(".")[0]  # "layer4"
    assert set(model.head) <= changed
    assert any(k.startswith(last) for k in changed)
    assert all(k.startswith(last) or k in model.head for k in changed), sorted(changed)


def test_finetune_backbone_learns_at_the_scaled_rate(phantom_cache):
    model = ClassificationModule(
        "test_resnet",
        num_classes=2,
        strategy=Strategy("finetune", 2, backbone_lr_scale=0.1),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5),
    )
    optimizer = model.configure_optimizers()

    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"head": 0.5, "backbone": 0.05}


def test_class_weights_follow_inverse_frequency():
    weights = inverse_frequency_weights([1341, 3875])

    # w_c = (1/n_c) / sum(1/n_k) * K
    expected = torch.tensor([1 / 1341, 1 / 3875]) / (1 / 1341 + 1 / 3875) * 2
    assert torch.allclose(weights, expected)
    assert weights[0] > 1 > weights[1]


class _RequiresGradPerEpoch(L.Callback):
    """Records, at each epoch's first batch, whether the last block and the stem train."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            params = dict(module.net.named_parameters())
            self.seen.append(
                (
                    params[module.blocks[-1][0]].requires_grad,
                    params[module.blocks[0][0]].requires_grad,
                )
            )


def test_two_stage_unfreezes_the_last_blocks_at_head_epochs(phantom_cache):
    strategy = Strategy("two_stage", unfreeze_last=1, backbone_lr_scale=0.1, head_epochs=2)
    model = ClassificationModule(
        "test_resnet",
        num_classes=2,
        strategy=strategy,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5),
    )
    data = PhantomDataModule(
        phantom_cache, n_patients=60, image_size=64, batch_size=16, num_workers=0
    )
    probe = _RequiresGradPerEpoch()
    trainer = L.Trainer(
        max_epochs=4,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[probe],
    )
    trainer.fit(model, datamodule=data)

    # (last block trains, stem trains) per epoch: head only for 2 epochs, then the last block
    assert probe.seen == [(False, False), (False, False), (True, False), (True, False)]
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["head"]["lr"] == 0.5 and groups["backbone"]["lr"] == 0.05
    last_block = {id(p) for n, p in model.net.named_parameters() if n in model.blocks[-1]}
    assert {id(p) for p in groups["backbone"]["params"]} == last_block


def test_the_strategy_is_logged_when_training_starts_not_when_a_model_is_built(
    phantom_cache, caplog
):
    with caplog.at_level(logging.INFO, logger="medx.models"):
        model = ClassificationModule("test_resnet", num_classes=2, strategy=Strategy("freeze", 0))
        assert "blocks trainable" not in caplog.text  # e.g. loaded to predict: nothing said
        _fit(model.strategy, phantom_cache)
    assert "strategy=freeze: 0/" in caplog.text and "blocks trainable" in caplog.text
