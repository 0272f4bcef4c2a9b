"""The FastAPI app: routes, the model's background loading, and errors as JSON.

`create_app(settings)` builds one app; `app_from_env()` is the factory uvicorn's worker
processes call (`MEDX_SERVE_*` variables, see `settings`). The model is loaded once, in a
thread started at start-up, so the server answers `/health` at once and `/ready` says 503
until the model (and its warm-up pass) is ready; requests for predictions meanwhile get 503
with a Retry-After. Decoding and inference run in worker threads, at most `cpu_count` at a
time, never on the event loop, which keeps serving health checks and reading uploads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

import medx
from medx.errors import MedxError
from medx.serve.docs import install_docs
from medx.serve.limits import Guard, Refused, error_body, error_response
from medx.serve.settings import Settings
from medx.serve.uploads import (
    Upload,
    decode,
    receive_upload,
    temporary_folder,
    warm_up_decoding,
)

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
                            "description": "a JPEG, PNG or DICOM file",
                        }
                    },
                }
            }
        },
    }
}


class Slot:
    """The model once loaded in its background thread, or why loading failed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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


def create_app(settings: Settings) -> FastAPI:
    """The service for `settings` (see the module docstring)."""
    slot = Slot(settings)
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
        "/segment) a JPEG, PNG or DICOM image.",
        lifespan=lifespan,
        middleware=middleware,
        docs_url=None,  # served by install_docs from the package's files, not a CDN
        redoc_url=None,
    )
    install_docs(app)
    _add_error_handlers(app)

    async def _decode(upload: Upload, intensity: str) -> np.ndarray:
        return await anyio.to_thread.run_sync(
            decode, upload, settings.max_pixels, intensity, limiter=work
        )

    @app.get("/health", summary="The process is alive")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready", summary="The model is loaded (503 until then)")
    async def ready() -> JSONResponse:
        try:
            model = slot.get()
        except Refused as err:
            return JSONResponse({"ready": False, **error_body(503, err.message)}, 503)
        return JSONResponse({"ready": True, "model": model.info})

    @app.get("/metadata", summary="The model card (without its training config)")
    async def metadata() -> dict[str, Any]:
        model = slot.get()
        card = {k: v for k, v in model.card.items() if k != "config"}
        return {"model": model.info, "card": card, "limits": _limits(settings)}

    @app.post("/predict", summary="Classify one image", openapi_extra=_UPLOAD)
    async def predict(request: Request, explain: bool = False) -> dict[str, Any]:
        """Calibrated probabilities, the decision at the operating point, the quality verdict
        (with --qc); `explain=true` adds the Grad-CAM overlay as a base64 PNG."""
        start = time.perf_counter()
        model = slot.get()
        with temporary_folder() as folder:
            upload = await receive_upload(request, Path(folder))
            received = time.perf_counter()
            image = await _decode(upload, model.intensity)
            raw = await _decode(upload, "none") if model.needs_raw(explain) else None
            decoded = time.perf_counter()
            answer = await anyio.to_thread.run_sync(
                model.classify, image, explain, raw, limiter=work
            )
        timing = answer.pop("timing_ms")
        done = time.perf_counter()
        return {
            "file": upload.name,
            "type": upload.kind,
            "size": [int(image.shape[1]), int(image.shape[0])],
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
        responses={200: {"content": {"image/png": {}}}},
    )
    async def segment(request: Request) -> Response:
        start = time.perf_counter()
        model = slot.get()
        with temporary_folder() as folder:
            upload = await receive_upload(request, Path(folder))
            image = await _decode(upload, model.intensity)
            mask = await anyio.to_thread.run_sync(model.segment, image, limiter=work)
        png = await anyio.to_thread.run_sync(_png, mask, limiter=work)
        headers = {
            "X-Medx-Model": model.info["id"],
            "X-Medx-Time-Ms": f"{1000 * (time.perf_counter() - start):.1f}",
        }
        return Response(png, media_type="image/png", headers=headers)

    app.state.slot = slot
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory (`medx.serve.app:app_from_env`): the settings from MEDX_SERVE_*."""
    if not logging.getLogger().handlers:  # a worker process: medx's log lines, as uvicorn's
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return create_app(Settings.from_env())


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
        "types": ["jpeg", "png", "dicom"],
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
