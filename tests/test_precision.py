"""`trainer=gpu` trains in bf16-mixed where the GPU has native bfloat16, else in 16-mixed."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from medx.config import compose
from medx.training.precision import mixed_precision


def test_bf16_where_supported_else_fp16():
    assert mixed_precision(bf16=True) == "bf16-mixed"
    assert mixed_precision(bf16=False) == "16-mixed"


def test_without_a_gpu_the_choice_is_fp16():
    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        assert mixed_precision() == ("bf16-mixed" if native else "16-mixed")
    else:
        assert mixed_precision() == "16-mixed"


def test_trainer_gpu_composes_with_this_machines_choice(tmp_path):
    cfg = compose(["trainer=gpu", f"paths.output_dir={tmp_path}"])

    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == mixed_precision()
    # resolved configs (MLflow params, the model card's YAML) carry the choice, not the resolver
    resolved = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert resolved["precision"] in ("bf16-mixed", "16-mixed")
    assert "${" not in OmegaConf.to_yaml(cfg.trainer, resolve=True)


def test_other_trainers_keep_full_precision():
    for choice in ("default", "cpu"):
        assert compose([f"trainer={choice}"]).trainer.precision == "32-true"
