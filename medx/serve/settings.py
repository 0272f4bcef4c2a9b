"""The service's settings: each one a command-line flag and an environment variable.

A flag wins over its variable, which wins over the default. The variables (`MEDX_SERVE_*`)
are also how uvicorn's worker processes (`--workers N`) receive the settings, and how a
container sets them; give the token as `MEDX_SERVE_TOKEN` rather than `--token`, which every
user of the machine can read in the process list.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medx.errors import ConfigError

ENV_PREFIX = "MEDX_SERVE_"
MB = 1_000_000
MAX_BYTES = 50 * MB  # uploads larger than this are cut off while they stream in
MAX_PIXELS = 50_000_000  # as medx.predict: larger images are refused before decoding
QC_MODES = ("flag", "refuse")
DRIFT_WINDOW = 200  # as medx.inference.shift.WINDOW (not imported: --help stays light)


@dataclass(frozen=True)
class Settings:
    """What one service runs: the model, where it listens, and what it accepts."""

    model: str  # a .ckpt, a .onnx file, or models:/NAME@alias, models:/NAME/VERSION
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1  # processes, each with its own copy of the model
    threads: int = 0  # PyTorch/onnxruntime threads per process (0: their default)
    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    cors_origins: tuple[str, ...] = ()
    token: str | None = None
    qc: str | None = None
    qc_mode: str = "flag"
    qc_threshold: float | None = None
    drift_window: int = DRIFT_WINDOW  # recent classified requests GET /drift tests
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ConfigError("--max-bytes and --max-pixels must be positive numbers.")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port (1 to 65535).")
        if self.workers < 1 or self.threads < 0:
            raise ConfigError("--workers must be at least 1 and --threads at least 0.")
        if self.drift_window < 2:
            raise ConfigError(
                f"--drift-window {self.drift_window}: the shift test of recent requests needs "
                f"a window of at least 2 images (default {DRIFT_WINDOW})."
            )
        if self.qc_mode not in QC_MODES:
            raise ConfigError(f"--qc-mode {self.qc_mode!r}: choose one of {', '.join(QC_MODES)}.")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token / MEDX_SERVE_TOKEN is empty; give a secret or unset it.")
        q = self.qc_threshold
        if q is not None and not (math.isfinite(q) and 0.0 <= q <= 1.0):
            raise ConfigError(
                f"--qc-threshold {q}: a threshold is a probability between 0 and 1 "
                "(e.g. --qc-threshold 0.3)."
            )

    @property
    def exposed(self) -> bool:
        """Listening beyond this machine (a host that is not a loopback address)."""
        if self.host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: whichever interface it names
            return True

    def check_files(self) -> None:
        """Fail at once, before the server starts, on a model file that is not there (the
        model itself is read after start-up: see `/ready`)."""
        for flag, value in (("MODEL", self.model), ("--qc", self.qc)):
            if value and not value.startswith("models:/") and not Path(value).is_file():
                raise ConfigError(
                    f"{flag} {value} is not a file; give a medx checkpoint (.ckpt), an ONNX "
                    "export (.onnx) or a registered model (models:/NAME@alias)."
                )

    def to_env(self) -> dict[str, str]:
        """The settings as `MEDX_SERVE_*` variables (unset ones left out)."""
        env = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            text = ",".join(value) if isinstance(value, tuple) else str(value)
            env[ENV_PREFIX + key.upper()] = text
        return env

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """The settings from `MEDX_SERVE_*` variables alone (uvicorn's worker processes)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            text = environ.get(ENV_PREFIX + f.name.upper())
            if text is not None:
                values[f.name] = _parse(f.name, text)
        if "model" not in values:
            raise ConfigError(f"{ENV_PREFIX}MODEL is not set: name the model to serve.")
        return cls(**values)


_INTS = ("port", "workers", "threads", "max_bytes", "max_pixels", "drift_window")


def _parse(name: str, text: str) -> Any:
    """One variable's text as the setting's type; ConfigError naming the variable."""
    try:
        if name in _INTS:
            return int(float(text))  # 5e7 is a fine way to write 50 M
        if name == "qc_threshold":
            return float(text)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={text!r} is not a number.") from None
    if name == "cors_origins":
        return tuple(o.strip() for o in text.split(",") if o.strip())
    return text


def parser() -> argparse.ArgumentParser:
    """`python -m medx.serve`'s flags; each default is its variable's value, if set."""

    def env(name: str, default: Any = None) -> Any:
        text = os.environ.get(ENV_PREFIX + name.upper())
        return default if text is None else _parse(name, text)

    p = argparse.ArgumentParser(
        prog="python -m medx.serve",
        description="Serve a medx model over HTTP: POST /predict, /segment; GET /health, "
        "/ready, /metadata, /drift, /docs. Every flag can be set as MEDX_SERVE_<FLAG>, e.g. "
        "MEDX_SERVE_MAX_BYTES; a flag wins over its variable.",
        epilog="Exit status: 0 after Ctrl-C; 1 for a bad setting, or a model that cannot be "
        "loaded (the log says why; the server stops within seconds of starting); 3 when the "
        "server cannot start (e.g. the port is taken). SIGTERM ends it as that signal does.",
    )
    p.add_argument(
        "model",
        nargs="?" if env("model") else None,
        default=env("model"),
        help="a medx checkpoint (.ckpt), an ONNX export (.onnx) or models:/NAME@alias",
    )
    p.add_argument("--host", default=env("host", "127.0.0.1"), help="0.0.0.0: all interfaces")
    p.add_argument("--port", type=int, default=env("port", 8000))
    p.add_argument("--workers", type=int, default=env("workers", 1), help="processes")
    p.add_argument(
        "--threads", type=int, default=env("threads", 0), help="inference threads (0: default)"
    )
    p.add_argument(
        "--max-bytes",
        type=float,
        default=env("max_bytes", MAX_BYTES),
        help="larger uploads are cut off with 413 (default 50e6)",
    )
    p.add_argument(
        "--max-pixels",
        type=float,
        default=env("max_pixels", MAX_PIXELS),
        help="larger images are refused before decoding (default 50e6)",
    )
    p.add_argument(
        "--cors-origins",
        default=",".join(env("cors_origins", ())),
        help="comma-separated origins allowed to call from a browser (default: none)",
    )
    p.add_argument("--token", default=env("token"), help="require 'Authorization: Bearer TOKEN'")
    p.add_argument("--qc", default=env("qc"), help="a data=quality checkpoint: quality verdicts")
    p.add_argument("--qc-mode", choices=QC_MODES, default=env("qc_mode", "flag"))
    p.add_argument("--qc-threshold", type=float, default=env("qc_threshold"))
    p.add_argument(
        "--drift-window",
        type=int,
        default=env("drift_window", DRIFT_WINDOW),
        help="recent classified requests GET /drift tests against the model's validation "
        f"images (default {DRIFT_WINDOW}; a shift reference on the card needed)",
    )
    p.add_argument("--log-level", default=env("log_level", "info"))
    return p


def from_args(argv: list[str] | None = None) -> Settings:
    """The settings of a command line (flags over `MEDX_SERVE_*` over defaults)."""
    return from_parsed(parser().parse_args(argv))


def from_parsed(args: argparse.Namespace) -> Settings:
    """The settings of parsed flags (ConfigError naming a bad one)."""
    return Settings(
        model=str(args.model),
        host=args.host,
        port=args.port,
        workers=args.workers,
        threads=args.threads,
        max_bytes=int(args.max_bytes),
        max_pixels=int(args.max_pixels),
        cors_origins=_parse("cors_origins", args.cors_origins),
        token=args.token,
        qc=args.qc,
        qc_mode=args.qc_mode,
        qc_threshold=args.qc_threshold,
        drift_window=args.drift_window,
        log_level=args.log_level,
    )
