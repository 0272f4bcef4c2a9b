"""Issue 13: `medx.serve` throughput and latency, beside in-process prediction of the same images.

Starts `python -m medx.serve` on a free loopback port and drives `POST /predict` with 1, 4 and
8 concurrent clients (threads with keep-alive httpx clients, a bounded number of requests
each): requests/s and client-side p50/p95 latency. Beside it, in this process and on the same
files, the same work without HTTP: one image at a time through `medx.inference.Predictor`
(read, resized, classified: batch 1), as one service request does. The ratio service
÷ in-process throughput has the goal ≥ 0.8. `medx.predict`'s batched folder run (batch 16,
2 DataLoader workers) is printed for scale. `--onnx` also exports the model
(`medx.export`) and serves the `.onnx` file with onnxruntime, against an in-process
onnxruntime baseline.

The model is an untrained resnet18 at --size px (the cost of a forward pass does not depend on
the weights), saved as a medx checkpoint with a card. Server and in-process side use the same
number of PyTorch threads. Each figure is the median of --repeats rounds; within a round the
sides alternate, so a noisy neighbour on a shared CPU slows them alike.

Usage: MEDX_DATA=/path python benchmarks/serve.py [--images 16] [--requests 48] [--repeats 3]
       [--size 224] [--threads 1] [--clients 1 4 8] [--onnx]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from medx.inference import Predictor
from medx.models.classifier import ClassificationModule

GOAL = 0.8


def write_checkpoint(path: Path, size: int) -> Path:
    """An untrained resnet18 as a medx checkpoint (what medx.models.load opens)."""
    torch.manual_seed(0)
    model = ClassificationModule("resnet18", 2)
    card = {
        "task": "classification",
        "module": "medx.models.classifier.ClassificationModule",
        "class_names": ["NORMAL", "PNEUMONIA"],
        "input": {"image_size": size},
        "operating_point": {"threshold": 0.5, "target_sensitivity": 0.95},
    }
    hparams = {k: v for k, v in dict(model.hparams).items() if v is None or _plain(v)}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "medx": card}, path)
    return path


def _plain(value: object) -> bool:
    return isinstance(value, str | int | float | bool | list | tuple | dict)


def in_process(model: torch.nn.Module, paths: list[Path]) -> float:
    """Seconds for the service's per-request work on every file, without HTTP."""
    predictor = Predictor(model)
    start = time.perf_counter()
    for path in paths:
        predictor.run([predictor.prepare(path)])
    return time.perf_counter() - start


def drive(url: str, payloads: list[bytes], clients: int, requests: int) -> dict[str, float]:
    """`requests` POST /predict shared by `clients` threads: req/s, p50 and p95 in ms."""
    latencies: list[float] = []
    errors: list[str] = []
    share = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for i in range(share[k]):
                body = payloads[(k + i * clients) % len(payloads)]
                start = time.perf_counter()
                answer = http.post("/predict", files={"file": ("x.jpeg", body)})
                latencies.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    errors.append(answer.text[:200])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ms = np.asarray(latencies) * 1000
    return {
        "rps": requests / wall,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
    }


class Service:
    """`python -m medx.serve MODEL` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, threads: int, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "medx.serve", str(model), "--port", str(port)]
        command += ["--threads", str(threads), "--log-level", "warning"]
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"medx.serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="per client level and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads, both sides")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--onnx", action="store_true", help="also serve the ONNX export")
    args = parser.parse_args()
    medx_data = Path(os.environ.get("MEDX_DATA", "../shared/data")).resolve()
    sources = sorted((medx_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))
    if not sources:
        sys.exit(f"MEDX_DATA={medx_data} has no chest_xray/: set MEDX_DATA to the data folder")
    paths = sources[: args.images]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "resnet18.ckpt", args.size)
        from medx.models.load import load

        models = {"pytorch": (load(ckpt), ckpt)}
        if args.onnx:
            from medx.export import export
            from medx.inference import OnnxModel

            onnx = export(ckpt, Path(tmp) / "resnet18.onnx", mlflow=False).path
            models["onnxruntime"] = (OnnxModel(onnx, threads=args.threads), onnx)
        services = {}
        try:
            for name, (_, file) in models.items():
                services[name] = Service(file, args.threads, Path(tmp) / f"{name}.log")
            report(args, {k: m for k, (m, _) in models.items()}, paths, services)
        finally:
            for service in services.values():
                service.stop()


def report(
    args: argparse.Namespace,
    models: dict[str, torch.nn.Module],
    paths: list[Path],
    services: dict[str, Service],
) -> None:
    n, payloads = len(paths), [p.read_bytes() for p in paths]
    folder = Predictor(models["pytorch"])
    for name, service in services.items():  # warm-up: connections, allocator, page cache
        drive(service.url, payloads, 2, 8)
        in_process(models[name], paths)
    inproc: dict[str, list[float]] = {name: [] for name in models}
    batched: list[float] = []
    served: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            inproc[name].append(n / in_process(model, paths))
        start = time.perf_counter()
        list(folder.stream(paths, batch_size=16, workers=2))
        batched.append(n / (time.perf_counter() - start))
        for name, service in services.items():
            for clients in args.clients:
                result = drive(service.url, payloads, clients, args.requests)
                served.setdefault((name, clients), []).append(result)
    base = {name: statistics.median(rates) for name, rates in inproc.items()}
    sizes = sorted({_shape(p) for p in paths})
    shown = "x".join(map(str, sizes[0])) + (" and larger" if len(sizes) > 1 else "")
    print(
        f"{n} chest X-ray JPEGs ({shown} px) -> resnet18 at {args.size} px, {args.threads} "
        f"inference thread(s), {os.cpu_count()} CPUs shared with other jobs; medians of "
        f"{args.repeats} rounds of {args.requests} requests per client level"
    )
    print(f"{'side':<40} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'÷ in-process':>13}")
    for name, rate in base.items():
        print(f"{f'in-process ({name}), one at a time':<40} {rate:7.1f} {1000 / rate:8.1f}")
    batch = statistics.median(batched)
    print(f"{'in-process, medx.predict batched':<40} {batch:7.1f}")
    for (name, clients), results in served.items():
        rps = statistics.median(r["rps"] for r in results)
        p50 = statistics.median(r["p50"] for r in results)
        p95 = statistics.median(r["p95"] for r in results)
        label = f"service ({name}), {clients} client{'s' if clients > 1 else ''}"
        print(f"{label:<40} {rps:7.1f} {p50:8.1f} {p95:8.1f} {rps / base[name]:13.2f}")
    for name in services:
        ratios = [
            statistics.median(r["rps"] for r in results) / base[name]
            for (backend, _), results in served.items()
            if backend == name
        ]
        verdict = "meets" if min(ratios) >= GOAL else "misses"
        print(
            f"service / in-process ({name}): {min(ratios):.2f} at worst over "
            f"{', '.join(map(str, args.clients))} clients ({verdict} the goal >= {GOAL})"
        )


def _shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.width, img.height


if __name__ == "__main__":
    main()
