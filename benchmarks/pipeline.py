"""Input pipeline: decoding every epoch against the decoded store (`data.cache`), and what the
model consumes.

A real-size set: the shared Kermany chest X-rays (224 px copies) upscaled to 1,024 and
2,048 px squares, with a little sensor noise (sigma 2 grey levels: a smooth upscale would
decode faster than a real radiograph), written as JPEG (quality 90) to a temporary folder in
class folders. For each size and worker count (0, 1, 2), the train loaders of two
`ImageFolderDataModule`s (224 px, `light` augmentation, batch 32), one with `data.cache=none`
and one with `disk`, run alone, their epochs alternating (the machine is shared: both sides
see the same drift). Per side: images/s (wall, median over the rounds after the first, which
starts the workers), CPU ms per image (this process and the loader's workers, less sensitive
to other people's load; this process runs its transforms on one thread, as each worker does)
and the peak resident memory: the largest sum of PSS over this
process and the loader's workers, sampled twice a second (PSS counts a page shared by n
processes as 1/n: the store read by two workers counts once). The speed-up is the median of
the per-round ratios. Then the model alone: resnet18 at 224 px, forward + backward + SGD step,
batch 32, all cores, median of 5 steps. Goals (issue 14): cached epochs >= 3x faster than
decoding, and the cached loader >= the model's consumption.

Usage: MEDX_DATA=/path/to/data python benchmarks/pipeline.py [--images 256] [--sizes 1024 2048]
       [--rounds 5] [--workers 0 1 2] [--augment light] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medx.data.folders import ImageFolderDataModule
from medx.models.classifier import ClassificationModule

CLASSES = ("NORMAL", "PNEUMONIA")
MIB = 2**20


def make_set(source: Path, folder: Path, side: int, n: int) -> Path:
    """`n` real X-rays (half of each class) upscaled to side x side JPEGs in folder/<class>/."""
    rng = np.random.default_rng(side)
    for label in CLASSES:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / label).glob("*.jpeg"))[: n // 2]:
            gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            big = cv2.resize(gray, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
            big = np.clip(big + rng.normal(0, 2, big.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / label / path.name), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


class Epochs:
    """Epochs of one loader: images, wall seconds, CPU seconds (this process and the loader's
    workers) and the peak PSS of those processes, sampled every 0.5 s."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.rates: list[float] = []
        self.cpu_ms: list[float] = []
        self.peak = 0.0

    def run(self) -> float:
        """One epoch; its images/s."""
        iterator = iter(self.loader)  # persistent workers: the same processes every epoch
        workers = getattr(iterator, "_workers", [])
        processes = [psutil.Process(), *(psutil.Process(w.pid) for w in workers)]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                total = 0
                for p in processes:
                    with suppress(psutil.Error):
                        total += p.memory_full_info().pss
                self.peak = max(self.peak, total / MIB)
                done.wait(0.5)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        cpu, wall = _cpu(processes), time.perf_counter()
        images = sum(len(x) for x, _ in iterator)
        wall, cpu = time.perf_counter() - wall, _cpu(processes) - cpu
        done.set()
        thread.join()
        self.rates.append(images / wall)
        self.cpu_ms.append(1000 * cpu / images)
        return self.rates[-1]


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        with suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def module(
    root: Path, cache: str, cache_dir: Path, workers: int, augment: str
) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        root,
        image_size=224,
        batch_size=32,
        num_workers=workers,
        augment=augment,
        val_from_train=0.1,
        test_from_train=0.1,
        cache=cache,
        cache_dir=cache_dir,
    )


def model_rate(steps: int = 5) -> float:
    """Images/s resnet18 trains at: 224 px, batch 32, forward + backward + SGD step."""
    torch.manual_seed(0)
    net = ClassificationModule(backbone="resnet18", num_classes=2, pretrained=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.rand(32, 3, 224, 224), torch.randint(0, 2, (32,))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    step()  # warm-up
    return 32 / statistics.median(step() for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per size (both classes)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rounds", type=int, default=5, help="epochs per side; first: warm-up")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--augment", default="light", help="none: as val/test epochs run")
    parser.add_argument("--folder", type=Path, help="where the set and the cache go (temp dir)")
    args = parser.parse_args()
    source = Path(os.environ.get("MEDX_DATA", "data")) / "chest_xray" / "train"
    if not source.is_dir():
        raise SystemExit(f"{source} is missing: set MEDX_DATA to the shared data folder.")
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        run(source, Path(tmp), args)


def run(source: Path, tmp: Path, args: argparse.Namespace) -> None:
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    threads = torch.get_num_threads()
    # One thread for the transforms in this process, as in each DataLoader worker: with 0
    # workers, OpenMP threads spinning on a CPU that other people's jobs also want would time
    # the machine's contention, not the loader.
    torch.set_num_threads(1)
    rows = []
    for side in args.sizes:
        start = time.perf_counter()
        root = make_set(source, tmp / f"set{side}", side, args.images)
        files = list(root.rglob("*.jpeg"))
        mean_kib = sum(f.stat().st_size for f in files) / len(files) / 1024
        print(
            f"{side} px: {len(files)} JPEGs, {mean_kib:.0f} KiB each on average "
            f"(written in {time.perf_counter() - start:.0f} s)"
        )
        modules = {}
        for cache in ("none", "disk"):
            cache_dir = tmp / f"cache{side}"
            start = time.perf_counter()
            module(root, cache, cache_dir, 0, args.augment).setup()  # decode pass (+ build)
            first = time.perf_counter() - start
            start = time.perf_counter()
            modules[cache] = module(root, cache, cache_dir, 0, args.augment)
            modules[cache].setup()  # what the next run pays
            again = time.perf_counter() - start
            stored = sum(f.stat().st_size for f in (cache_dir / "decoded").glob("*.medxcache"))
            print(
                f"  cache={cache}: setup {first:.1f} s, next run {again:.1f} s"
                + (f", store {stored / MIB:.1f} MiB" if cache == "disk" else "")
            )
        for workers in args.workers:
            sides = {}
            for cache, dm in modules.items():
                dm.num_workers = workers
                sides[cache] = Epochs(dm.train_dataloader())
            ratios = []
            for _ in range(args.rounds):
                ratios.append(sides["disk"].run() / sides["none"].run())
            for cache, epochs in sides.items():
                rate = statistics.median(epochs.rates[1:])
                cpu = statistics.median(epochs.cpu_ms[1:])
                ratio = statistics.median(ratios[1:]) if cache == "disk" else 1.0
                rows.append((side, cache, workers, rate, cpu, ratio, epochs.peak))
                print(
                    f"    {workers} workers, cache={cache}: {rate:6.1f} images/s, "
                    f"{cpu:5.1f} CPU ms/image, x{ratio:.1f}, peak PSS {epochs.peak:5.0f} MiB"
                )
            del sides  # persistent workers end here
    torch.set_num_threads(threads)
    consumed = model_rate()
    print(f"\nresnet18 at 224 px, batch 32, fwd+bwd+step: {consumed:.1f} images/s")
    print(
        "\n| size | data.cache | workers | loader images/s | CPU ms/image | x decoding "
        "| peak PSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for side, cache, workers, rate, cpu, ratio, peak in rows:
        print(
            f"| {side} | {cache} | {workers} | {rate:.1f} | {cpu:.1f} | {ratio:.1f} | {peak:.0f} |"
        )
    speedups = [r[5] for r in rows if r[1] == "disk"]
    slowest = min(r[3] for r in rows if r[1] == "disk")
    print(
        f"\ncached / decoding: {min(speedups):.1f}x to {max(speedups):.1f}x (goal >= 3); slowest "
        f"cached loader {slowest:.0f} images/s vs the model's {consumed:.0f} (goal >=)"
    )
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
