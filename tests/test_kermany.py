"""`experiment=kermany_cpu` / `kermany_gpu` compose and run on a few hundred real Kermany images."""

from __future__ import annotations

from pathlib import Path

import pytest

from medx.config import compose
from medx.models.load import load
from medx.train import train


@pytest.fixture
def small_kermany(medx_data: Path, tmp_path: Path) -> Path:
    """120 NORMAL + 120 PNEUMONIA training images (links), val and test carved by patient."""
    root = tmp_path / "chest_xray"
    for name in ("NORMAL", "PNEUMONIA"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for path in sorted((medx_data / "chest_xray" / "train" / name).glob("*.jpeg"))[:120]:
            (folder / path.name).symlink_to(path)
    return root


def test_the_recipes_say_what_they_choose():
    cpu, gpu = compose(["experiment=kermany_cpu"]), compose(["experiment=kermany_gpu"])
    assert cpu.data.name == gpu.data.name == "pneumonia"
    assert cpu.data.intensity == gpu.data.intensity == "zscore"
    # chosen for robustness: simulated scanner shifts in training (docs/benchmarks.md)
    assert cpu.data.augment == gpu.data.augment == "acquisition"
    assert not cpu.model.pretrained and not gpu.model.pretrained  # from scratch: no download
    assert cpu.trainer.accelerator != "gpu" and gpu.trainer.accelerator == "gpu"
    assert "bf16" in str(gpu.trainer.precision) or "16" in str(gpu.trainer.precision)
    assert cpu.monitor == gpu.monitor == "val/auroc"


@pytest.mark.parametrize(
    ("experiment", "device"),
    [
        ("kermany_cpu", []),
        # the GPU recipe on this CPU: same model, data and loss; one small batch in fp32
        ("kermany_gpu", ["trainer.accelerator=cpu", "trainer.precision=32-true",
                         "scheduler.warmup_epochs=1", "data.image_size=64",
                         "data.num_workers=0"]),
    ],
)  # fmt: skip
def test_a_short_real_run(make_cfg, small_kermany: Path, experiment: str, device: list[str]):
    cfg = make_cfg(
        f"experiment={experiment}",
        f"data.root={small_kermany}",
        "model.backbone=test_resnet",
        "data.batch_size=16",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=2",
        "eval.bootstrap=20",
        *device,
    )
    metrics = train(cfg)

    (best,) = (Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt")
    card = load(best).card
    assert card["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert card["input"]["intensity"] == "zscore"
    assert card["data"]["patient_pattern"] == cfg.data.patient_pattern
    assert card["operating_point"]["threshold"] == pytest.approx(metrics["test/threshold_at_op"])
