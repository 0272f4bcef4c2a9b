"""The FastAPI app: routes, the model's background loading, and errors as JSON.

`create_app(settings)` builds one app; `app_from_env()` is the factory uvicorn's worker
processes call (`MEDX_SERVE_*` variables, see `settings`). The model is loaded once, in a
thread started at start-up, so the server answers `/health` at once and `/ready` says 503
until the model (and its warm-up pass) is ready; requests for predictions meanwhile get 503
with a Retry-After. A model that cannot be loaded will not load on a retry either: the
command's process (`app_from_env`) logs why in one line and exits with a non-zero status
(`stop_process`), so a supervisor or an orchestrator sees the failure instead of a service
that answers 503 forever; an app made by `create_app` alone keeps answering 503 with the
reason. Decoding and inference run in worker threads, at most `cpu_count` at a
time, never on the event loop, which keeps serving health checks and reading uploads.

Every answer has a pydantic model (`PredictAnswer`, `MetadataAnswer`, ..., `ErrorAnswer` for
every refusal), so /docs shows the real JSON. The work itself is `medx.inference`'s
(`medx.serve.model`): this module only carries requests and answers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

import medx
from medx.errors import MedxError
from medx.serve.docs import install_docs
from medx.serve.limits import TYPES, Guard, Refused, error_body, error_response
from medx.serve.settings import Settings
from medx.serve.uploads import read_upload, receive_upload, temporary_folder, warm_up_decoding

log = logging.getLogger("medx.serve")

_UPLOAD = {  # the request body of /predict and /segment, for /docs (parsed by uploads.py)
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "a JPEG, PNG, BMP, TIFF, WebP or DICOM file",
                        }
                    },
                }
            }
        },
    }
}

Scale = Literal["raw", "calibrated"]


# --- the answers, as /docs shows them ---------------------------------------------------------


class ErrorAnswer(BaseModel):
    """Every refusal and error: the HTTP status, its reason phrase, and what to do."""

    status: int = Field(examples=[422])
    error: str = Field(examples=["Unprocessable Content"])
    message: str = Field(examples=["Image 'cut.jpeg' is truncated (...). Send the complete ..."])


class ModelInfo(BaseModel):
    """Which model answered: name, version (registered, else a digest of the file), run."""

    id: str = Field(description="NAME@RUN, as medx.predict's `model` column")
    name: str
    version: str | None
    run_id: str | None
    task: str | None
    backend: Literal["pytorch", "onnxruntime"]


class DecisionAnswer(BaseModel):
    """A binary model's decision at its threshold, on the probabilities' scale."""

    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", description="the class decided")
    threshold: float
    scale: Scale = Field(description="the threshold's probability scale")
    source: str = Field(description="where the threshold came from")


class QualityAnswer(BaseModel):
    """The quality gate's verdict (--qc); a refused image is not classified."""

    verdict: Literal["good", "bad"]
    p_bad: float
    threshold: float
    refused: bool
    reason: str | None


class PredictTiming(BaseModel):
    upload: float
    decode: float
    queue: float
    inference: float
    total: float


class PredictAnswer(BaseModel):
    """POST /predict: the answer for one image."""

    file: str = Field(description="the uploaded file's name")
    type: Literal["jpeg", "png", "bmp", "tiff", "webp", "dicom"] = Field(
        description="told from its bytes"
    )
    size: list[int] = Field(description="[width, height] in pixels")
    predicted: str | None = Field(description="the most probable class (null: refused)")
    probabilities: dict[str, float] | None = Field(description="per class, on `scale`")
    decision: DecisionAnswer | None = Field(description="null: the model has no threshold")
    temperature: float
    scale: Scale = Field(description="the probabilities' scale")
    quality: QualityAnswer | None = Field(description="null: no quality model (--qc)")
    gradcam_png: str | None = Field(None, description="with explain=true: base64 PNG overlay")
    ood_score: float | None = Field(
        None,
        description="the shift monitor's out-of-distribution score of this image: about 1 "
        "for a typical validation image (null: no shift reference, or not classified)",
    )
    ood_flag: bool | None = Field(
        None, description="ood_score above the 99th percentile of held-out validation images"
    )
    model: ModelInfo
    timing_ms: PredictTiming


class DecisionRuleAnswer(BaseModel):
    """The threshold the service decides at, on the scale of the probabilities it reports
    (the card's operating point is stored on the raw scale, labelled so in `card`)."""

    threshold: float
    scale: Scale
    source: str


class Limits(BaseModel):
    max_bytes: int
    max_pixels: int
    types: list[str]
    token_required: bool


class MetadataAnswer(BaseModel):
    """GET /metadata: the model card (no training config, no local paths, no credentials)."""

    model: ModelInfo
    card: dict[str, Any]
    decision: DecisionRuleAnswer | None
    limits: Limits


class DriftAnswer(BaseModel):
    """GET /drift: the shift monitor's two-sample test of the last `window` classified
    requests against the model's validation images (MMD permutation test of the features,
    Bonferroni-combined with a KS test of the scores; `medx.evaluation.drift`)."""

    model: ModelInfo
    status: Literal["collecting", "tested", "unavailable"] = Field(
        description="collecting: fewer than min_images requests yet; unavailable: no shift "
        "reference on the model card (`reason` says how to add one)"
    )
    reason: str | None = Field(None, description="why the monitor is unavailable")
    window: int | None = Field(None, description="requests kept (--drift-window)")
    images: int | None = Field(None, description="requests in the window now")
    seen: int | None = Field(None, description="classified requests since the start")
    min_images: int | None = Field(None, description="requests needed before a test")
    p_value: float | None = Field(None, description="the verdict's p-value (small: shifted)")
    shifted: bool | None = Field(None, description="p_value below `significance`")
    significance: float | None = None
    effect: float | None = Field(None, description="MMD² in standard deviations of its null")
    feature_p: float | None = Field(None, description="p-value of the feature test")
    mmd2: float | None = None
    score_ks: float | None = Field(None, description="KS statistic of the scores")
    score_p: float | None = Field(None, description="p-value of the score test")
    ood_rate: float | None = Field(None, description="share of the window's images flagged")
    feature_images: int | None = None


class ReadyAnswer(BaseModel):
    ready: bool
    model: ModelInfo


class HealthAnswer(BaseModel):
    status: Literal["alive"]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorAnswer, "description": text}
    for code, text in (
        (400, "the wrong endpoint for this model, or explain=true on ONNX"),
        (401, "a bearer token is required"),
        (413, "too many bytes or pixels"),
        (415, "not a JPEG, PNG, BMP, TIFF, WebP or DICOM file"),
        (422, "an unreadable image or a malformed request"),
        (503, "the model is loading, or could not be loaded"),
    )
}


class Slot:
    """The model once loaded in its background thread, or why loading failed.

    Args:
        settings: what to load.
        on_failure: called with the reason when loading fails (after it is logged), e.g.
            `stop_process`; None: the app answers 503 with the reason.
    """

    def __init__(self, settings: Settings, on_failure: Callable[[str], None] | None = None) -> None:
        self.settings, self.on_failure = settings, on_failure
        self.model: Any = None  # a medx.serve.model.ServedModel once loaded
        self.error: str | None = None
        self.thread = threading.Thread(target=self._load, name="medx-load-model", daemon=True)

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            from medx.serve.model import ServedModel  # imports torch: seconds, off the loop

            warm_up_decoding()
            self.model = ServedModel.load(self.settings)
        except MedxError as err:
            self.error = str(err)
        except Exception as err:  # a bug, not the user's: keep the traceback in the log
            log.exception("Loading %s failed", self.settings.model)
            self.error = f"{type(err).__name__}: {err}"
        if self.error:
            log.error("medx.serve cannot serve %s: %s", self.settings.model, self.error)
            if self.on_failure is not None:
                self.on_failure(self.error)
        else:
            seconds = time.perf_counter() - start
            log.info("Ready: %s (%s) in %.1f s", self.model.info["id"], self.model.backend, seconds)

    def get(self) -> Any:
        """The model, or Refused(503) saying why there is none."""
        if self.model is not None:
            return self.model
        if self.error is not None:
            raise Refused(503, f"The model could not be loaded: {self.error}")
        raise Refused(
            503,
            "The model is still loading; retry in a few seconds (GET /ready answers 200 "
            "once it is ready).",
            {"Retry-After": "2"},
        )


def create_app(settings: Settings, on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The service for `settings` (see the module docstring).

    Args:
        settings: the model and limits.
        on_load_failure: what to do when the model cannot be loaded, besides logging why
            (`stop_process` ends the process; None: answer 503 with the reason).
    """
    slot = Slot(settings, on_load_failure)
    work = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        slot.thread.start()
        yield

    middleware = [Middleware(Guard, max_bytes=settings.max_bytes, token=settings.token)]
    if settings.cors_origins:
        cors = Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
        middleware.insert(0, cors)  # outermost: its headers go on the Guard's refusals too
    app = FastAPI(
        title="medx",
        version=medx.__version__,
        description="A medx model over HTTP: classify (POST /predict) or segment (POST "
        "/segment) a JPEG, PNG, BMP, TIFF, WebP or DICOM image.",
        lifespan=lifespan,
        middleware=middleware,
        docs_url=None,  # served by install_docs from the package's files, not a CDN
        redoc_url=None,
    )
    install_docs(app)
    _add_error_handlers(app)

    @app.get("/health", summary="The process is alive", response_model=HealthAnswer)
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/ready",
        summary="The model is loaded (503 until then)",
        response_model=ReadyAnswer,
        responses={503: _ERRORS[503]},
    )
    async def ready() -> Any:
        try:
            model = slot.get()
        except Refused as err:
            return JSONResponse({"ready": False, **error_body(503, err.message)}, 503)
        return {"ready": True, "model": model.info}

    @app.get(
        "/metadata",
        summary="The model card (without its training config or local paths)",
        response_model=MetadataAnswer,
        responses={k: _ERRORS[k] for k in (401, 503)},
    )
    async def metadata() -> dict[str, Any]:
        model = slot.get()
        return {
            "model": model.info,
            "card": model.card.public_dict(),
            "decision": model.decision,
            "limits": _limits(settings),
        }

    @app.post(
        "/predict",
        summary="Classify one image",
        openapi_extra=_UPLOAD,
        response_model=PredictAnswer,
        responses=_ERRORS,
    )
    async def predict(request: Request, explain: bool = False) -> dict[str, Any]:
        """Calibrated probabilities, the decision at the operating point (with its scale),
        the quality verdict (with --qc); `explain=true` adds the Grad-CAM overlay as a base64
        PNG."""
        start = time.perf_counter()
        model = slot.get()
        with temporary_folder() as folder:
            upload = await receive_upload(request, Path(folder))
            received = time.perf_counter()
            prepared = await anyio.to_thread.run_sync(
                read_upload, upload, lambda p, n: model.prepare(p, n, explain), limiter=work
            )
            decoded = time.perf_counter()
            answer = await anyio.to_thread.run_sync(model.classify, prepared, explain, limiter=work)
        timing = answer.pop("timing_ms")
        done = time.perf_counter()
        return {
            "file": upload.name,
            "type": upload.kind,
            **answer,
            "model": model.info,
            "timing_ms": {
                "upload": 1000 * (received - start),
                "decode": 1000 * (decoded - received),
                **timing,
                "total": 1000 * (done - start),
            },
        }

    @app.post(
        "/segment",
        summary="Segment one image: the mask as PNG (0/255, at the image's size)",
        openapi_extra=_UPLOAD,
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **_ERRORS},
    )
    async def segment(request: Request) -> Response:
        start = time.perf_counter()
        model = slot.get()
        with temporary_folder() as folder:
            upload = await receive_upload(request, Path(folder))
            image = await anyio.to_thread.run_sync(
                read_upload, upload, model.read_for_mask, limiter=work
            )
            mask = await anyio.to_thread.run_sync(model.segment, image, limiter=work)
        png = await anyio.to_thread.run_sync(_png, mask, limiter=work)
        headers = {
            "X-Medx-Model": model.info["id"],
            "X-Medx-Time-Ms": f"{1000 * (time.perf_counter() - start):.1f}",
        }
        return Response(png, media_type="image/png", headers=headers)

    @app.get(
        "/drift",
        summary="Shift monitor: are recent requests like the validation images?",
        response_model=DriftAnswer,
        responses={k: _ERRORS[k] for k in (401, 503)},
    )
    async def drift() -> dict[str, Any]:
        """The two-sample test of the last `--drift-window` classified requests against the
        validation images the model card keeps: p-value, verdict and effect size, or
        `collecting` until enough requests came. Each worker process keeps its own window."""
        model = slot.get()
        found = await anyio.to_thread.run_sync(model.drift, limiter=work)
        return {"model": model.info, **found}

    app.state.slot = slot
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory (`medx.serve.app:app_from_env`): the settings from MEDX_SERVE_*; a
    model that cannot be loaded ends the process (`stop_process`)."""
    if not logging.getLogger().handlers:  # a worker process: medx's log lines, as uvicorn's
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return create_app(Settings.from_env(), stop_process)


# How a process that cannot load its model ends: a worker of `--workers N` with uvicorn's
# STARTUP_FAILURE status, on which uvicorn's supervisor stops instead of restarting it (and
# tells the command through FAILURE_FILE), the one process of `--workers 1` with status 1.
WORKER_FAILED, FAILED = 3, 1
FAILURE_FILE = "MEDX_SERVE_FAILURE_FILE"


def stop_process(reason: str) -> None:
    """End this server process at once, its log flushed: the model cannot be loaded, and
    nothing it could answer but 503 would help anyone."""
    import multiprocessing
    import shutil
    import sys

    worker = multiprocessing.parent_process() is not None
    marker = os.environ.get(FAILURE_FILE)
    if marker and worker:
        Path(marker).write_text(reason)
    elif marker:  # the command's own process: nothing will clean its temporary folder
        shutil.rmtree(Path(marker).parent, ignore_errors=True)
    for handler in logging.getLogger().handlers + logging.getLogger("uvicorn").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(WORKER_FAILED if worker else FAILED)


def _png(mask: Any) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", mask)
    if not ok:
        raise RuntimeError("OpenCV could not encode the mask as PNG")
    return data.tobytes()


def _limits(settings: Settings) -> dict[str, Any]:
    return {
        "max_bytes": settings.max_bytes,
        "max_pixels": settings.max_pixels,
        "types": list(TYPES),
        "token_required": settings.token is not None,
    }


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is `{"status", "error", "message"}` (limits.error_body), also the
    framework's own (404, 405, a bad query parameter) and a bug's 500."""

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = str(err.detail)
        if err.status_code == 404:
            message = f"No such endpoint {request.url.path}; see /docs for the API."
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs."
        return JSONResponse(error_body(err.status_code, message), err.status_code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors()
        )
        return JSONResponse(error_body(422, f"Invalid request ({problems}); see /docs."), 422)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("Unexpected error on %s %s", request.method, request.url.path)
        message = (
            f"The service failed on this request ({type(err).__name__}); this is a bug in medx, "
            "not a problem with your file. The operator will find the traceback in the log."
        )
        return JSONResponse(error_body(500, message), 500)
