"""Issue 23: does the shift monitor cry wolf, and does it see acquisition shifts?

On a Kermany model (a checkpoint, or one trained here: `experiment=kermany_cpu` for
`--epochs` epochs), with the patient-grouped carved test split of its run as the
in-distribution source (never seen in training or in the val reference):

- false alarms: the share of random in-distribution batches of 100 the monitor flags
  (target <= 5%; its alarm level is 1%);
- power: the share of random batches of 50 / 100 / 200 shifted test images it flags, per
  simulated acquisition shift (`medx.data.acquisition`) and severity, with the share of
  single images past the OOD threshold;
- beside it, the stress test of the same images: AUROC, sensitivity and specificity at the
  val-chosen operating point.

Usage: MEDX_DATA=/path OMP_NUM_THREADS=1 python benchmarks/shift.py [--checkpoint CKPT]
       [--epochs 4] [--draws 30] [--alarm-draws 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate

from medx.data.acquisition import SEVERITIES, SHIFTS
from medx.data.shifted import ShiftedImages
from medx.eval import load_config
from medx.evaluation import metrics
from medx.evaluation.stress import features_and_probs
from medx.inference.shift import ShiftMonitor
from medx.models.load import load

SIZES = (50, 100, 200)


def train(root: Path, home: Path, epochs: int) -> Path:
    """`experiment=kermany_cpu` for `epochs` epochs; its selected checkpoint."""
    env = {**os.environ, "MEDX_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home}/m.db"}
    command = [
        sys.executable, "-m", "medx.train", "experiment=kermany_cpu", f"data.root={root}",
        f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null", "eval.bootstrap=200", f"hydra.run.dir={home}/run",
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=home, stdout=subprocess.DEVNULL)
    (ckpt,) = (home / "run" / "checkpoints").glob("epoch*.ckpt")
    return ckpt


def carved_test(ckpt: Path, root: Path) -> tuple[list[Path], np.ndarray]:
    """The test split the checkpoint's run carved (by patient) out of `root`."""
    cfg = load_config(ckpt, [f"data.root={root}"])
    dm = instantiate(cfg.data, _convert_="object")
    dm.setup("test")
    test = dm.splits["test"]
    return list(test.paths), np.asarray(test.labels)


def flagged(
    monitor: ShiftMonitor, feats: np.ndarray, probs: np.ndarray, size: int, draws: int, seed: int
) -> float:
    """Share of `draws` random batches of `size` images (without replacement) flagged; NaN
    when there are fewer images than `size`."""
    if size > len(feats):
        return float("nan")
    rng = np.random.default_rng(seed)
    batches = [rng.choice(len(feats), size, replace=False) for _ in range(draws)]
    return float(np.mean([monitor.test(feats[b], probs[b, 1]).shifted for b in batches]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a Kermany classifier (default: train)")
    parser.add_argument("--epochs", type=int, default=4, help="when training here")
    parser.add_argument("--draws", type=int, default=30, help="batches per power cell")
    parser.add_argument("--alarm-draws", type=int, default=200, help="in-distribution batches")
    args = parser.parse_args()
    medx_data = Path(os.environ.get("MEDX_DATA", "../shared/data")).resolve()
    train_dir = medx_data / "chest_xray" / "train"
    if not train_dir.is_dir():
        sys.exit(f"MEDX_DATA={medx_data} has no chest_xray/train: set MEDX_DATA")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "chest_xray"
        root.mkdir()
        (root / "train").symlink_to(train_dir)  # val/ and test/ absent: carved by patient
        start = time.perf_counter()
        ckpt = args.checkpoint or train(root, Path(tmp), args.epochs)
        trained = time.perf_counter() - start
        report(ckpt, root, args, trained)


def report(ckpt: Path, root: Path, args: argparse.Namespace, trained: float) -> None:
    model = load(ckpt)
    card = model.card
    monitor = ShiftMonitor.from_card(card, str(ckpt))
    threshold = (card.get("operating_point") or {}).get("threshold")
    size, intensity = card["input"]["image_size"], card["input"]["intensity"]
    paths, labels = carved_test(ckpt, root)
    info = monitor.reference.info
    print(
        f"model {card.get('run', {}).get('name', ckpt.name)}: {size} px, intensity {intensity}"
        f" ({trained / 60:.1f} min to train); reference: {info['reference_images']} val images"
        f" ({info['pca_images']} for PCA, {info['components']} components); carved test "
        f"{len(paths)} images ({int(labels.sum())} positive)"
    )
    start = time.perf_counter()
    clean, probs = features_and_probs(model, ShiftedImages(paths, labels, size, intensity))
    seconds = time.perf_counter() - start
    alarms = flagged(monitor, clean, probs, 100, args.alarm_draws, seed=1)
    disjoint = np.random.default_rng(2).permutation(len(clean))
    blocks = [
        monitor.test(clean[b], probs[b, 1]).shifted
        for b in (disjoint[i : i + 100] for i in range(0, len(clean) - 99, 100))
    ]
    tick = time.perf_counter()
    monitor.test(clean[:100], probs[:100, 1])
    per_test = time.perf_counter() - tick
    print(
        f"false alarms: {alarms:.1%} of {args.alarm_draws} random in-distribution batches of 100"
        f" (target <= 5%; alarm level {monitor.significance:.0%}); {sum(blocks)} of "
        f"{len(blocks)} disjoint batches; one test {per_test * 1000:.0f} ms, features "
        f"{len(paths) / seconds:.0f} images/s"
    )
    _, ood = monitor.ood(clean)
    print(f"per-image OOD flags on in-distribution images: {ood.mean():.1%} (99th pct of val)")
    header = "| shift | severity | power n=50 | n=100 | n=200 | OOD flags | AUROC | sens | spec |"
    print(header)
    print("|---" * 9 + "|")
    auroc = metrics.auroc(labels, probs)[0]
    print(f"| none | 0 | {alarms_cell(monitor, clean, probs, args)} | {ood.mean():.0%} |"
          f" {auroc:.3f} | {rates(labels, probs, threshold)} |")  # fmt: skip
    for shift in SHIFTS:
        for severity in range(1, SEVERITIES + 1):
            data = ShiftedImages(paths, labels, size, intensity, shift, severity)
            feats, probs = features_and_probs(model, data)
            power = " | ".join(
                f"{flagged(monitor, feats, probs, n, args.draws, seed=3):.0%}" for n in SIZES
            )
            _, ood = monitor.ood(feats)
            print(
                f"| {shift} | {severity} | {power} | {ood.mean():.0%} | "
                f"{metrics.auroc(labels, probs)[0]:.3f} | {rates(labels, probs, threshold)} |",
                flush=True,
            )


def alarms_cell(
    monitor: ShiftMonitor, clean: np.ndarray, probs: np.ndarray, args: argparse.Namespace
) -> str:
    return " | ".join(f"{flagged(monitor, clean, probs, n, args.draws, 3):.0%}" for n in SIZES)


def rates(labels: np.ndarray, probs: np.ndarray, threshold: float | None) -> str:
    if threshold is None:
        return "- | -"
    found = metrics.rates(labels, (probs[:, 1] >= threshold).astype(int), 2)
    return f"{found['sensitivity'][0]:.3f} | {found['specificity'][0]:.3f}"


if __name__ == "__main__":
    main()
