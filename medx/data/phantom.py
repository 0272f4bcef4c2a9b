"""Procedural chest-X-ray-like phantom images with lung masks.

Why: training, tests and sweeps must run on a fresh machine without downloading a data set.
The images are crude chest radiographs (body, lungs, ribs, spine, heart); the positive class
("OPACITY") adds soft, patchy, often faint blobs inside the lungs. Acquisition nuisances
(exposure, gamma, shift, rotation, blur, noise) and distractors shared by both classes keep
the task learnable but not trivial. Everything is deterministic from a seed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from medx.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CLASSES = ("NORMAL", "OPACITY")
# Part of the cache directory name: bump it whenever rendering changes (no stale caches).
GENERATOR_VERSION = 1
# Attenuation an opacity must add to a pixel to count in its region (the lungs darken by ~0.3).
OPACITY_LEVEL = 0.02


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field of about [0, 1]: upsampled coarse noise, a cheap stand-in for Perlin."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with sigma given as a fraction of the image size (resolution independent)."""
    return cv2.GaussianBlur(img, (0, 0), sigma * img.shape[0])


def sample_anatomy(rng: np.random.Generator) -> dict:
    """Draw one patient's geometry, in fractions of the image size, so several images share it.

    Opacity parameters are drawn for every patient (used only for positives), so the random stream,
    and hence the anatomy, does not depend on the label.
    """
    u = rng.uniform
    lungs = []
    for side in (-1.0, 1.0):  # -1: viewer's left = patient's right
        lungs.append(
            {
                "cx": 0.5 + side * u(0.19, 0.23),
                "cy": u(0.42, 0.47),
                "ax": u(0.12, 0.16),
                "ay": u(0.26, 0.32),
                "taper": u(0.15, 0.35),
                "harm": rng.normal(0.0, 0.03, 3),
                "phase": u(0.0, 2 * np.pi, 3),
            }
        )
    vessels = []  # polylines from each hilum towards the lung periphery (lung markings)
    for lung, side in zip(lungs, (-1.0, 1.0), strict=True):
        for _ in range(rng.integers(6, 11)):
            ang = np.pi / 2 + side * u(0.3, 2.6) + np.cumsum(rng.normal(0.0, 0.35, 3))
            step = u(0.04, 0.09) * np.array([lung["ax"], lung["ay"]]) / 0.13
            pts = np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * step, 0)
            start = [lung["cx"] - side * 0.6 * lung["ax"], lung["cy"] + u(-0.05, 0.08)]
            vessels.append((np.vstack([start, start + pts]), u(0.06, 0.14)))
    n_nod = rng.poisson(1.0)  # small bright nodules (vessels seen end-on): distractors
    nodules = [
        (rng.integers(2), *_in_lung(rng, 0.8), u(0.008, 0.018), u(0.05, 0.2)) for _ in range(n_nod)
    ]
    opacities = [
        (
            rng.integers(2),
            *_in_lung(rng, 0.7, low=0.25),
            u(0.05, 0.11),
            u(0.05, 0.11),
            0.2 + 0.4 * rng.beta(2.0, 1.5),
        )
        for _ in range(rng.choice(3, p=[0.5, 0.35, 0.15]) + 1)
    ]
    return {
        "body": (u(-0.02, 0.02), u(0.44, 0.50), u(0.75, 0.85)),  # dx, half-width, half-height
        "lungs": lungs,
        "lung_dark": u(0.28, 0.36),
        "heart": (0.5 + u(0.04, 0.10), u(0.60, 0.66), u(0.13, 0.18), u(0.10, 0.14)),
        "ribs": (u(0.08, 0.13), u(0.065, 0.08), u(2.2, 3.2), u(0.35, 0.5), u(0.07, 0.12)),
        "spine": (u(0.035, 0.05), u(0.12, 0.2)),
        "clavicle": (u(0.14, 0.2), u(0.02, 0.06), u(0.26, 0.34)),
        "breast": u(0.0, 0.12) * (rng.random() < 0.5),
        "vessels": vessels,
        "nodules": nodules,
        "opacities": opacities,
    }


def _in_lung(rng: np.random.Generator, radius: float, low: float = 0.0) -> tuple[float, float]:
    """Point in lung-unit coordinates (ellipse of radius `radius`), shifted down by `low`."""
    ang, rad = rng.uniform(0.0, 2 * np.pi), radius * np.sqrt(rng.random())
    return rad * np.cos(ang), min(rad * np.sin(ang) + low, radius)


def render_phantom(
    rng: np.random.Generator, size: int, opacity: bool, anatomy: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 HxW, lung mask uint8 HxW 0/255).

    `anatomy` (from `sample_anatomy`) lets two images of one patient share geometry; `rng` then only
    draws the acquisition (and the slight drift of opacities between visits).
    """
    image, lungs, _ = render_phantom_regions(rng, size, opacity, anatomy)
    return image, lungs


def render_phantom_regions(
    rng: np.random.Generator, size: int, opacity: bool, anatomy: dict | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image, lung mask, opacity mask), the masks uint8 HxW 0/255.

    The image and lung mask are those of `render_phantom` for the same arguments (same random
    stream). The opacity mask is where the drawn opacities raise the attenuation by at least
    `OPACITY_LEVEL`, moved with the image: ground truth for where a classifier should look
    (Grad-CAM tests). It is empty for negatives.
    """
    a = sample_anatomy(rng) if anatomy is None else anatomy
    s, u = size, rng.uniform
    orng = np.random.default_rng(rng.integers(2**63))  # opacity draws leave acquisition alone
    x = ((np.arange(s, dtype=np.float32) + 0.5) / s)[None, :]
    y = ((np.arange(s, dtype=np.float32) + 0.5) / s)[:, None]
    bdx, bax, bay = a["body"]
    bx, by = (x - 0.5 - bdx) / bax, (y - 0.62) / bay
    body = np.clip((1 - np.abs(bx) ** 3 - np.abs(by) ** 3) * 6, 0, 1)
    att = body * (0.42 + 0.22 * np.sqrt(np.clip(1 - bx**2, 0, 1)))  # thicker centre is brighter
    lung = np.zeros((s, s), bool)
    for L in a["lungs"]:
        v = (y - L["cy"]) / L["ay"]
        lu = (x - L["cx"]) / (L["ax"] * (1 + L["taper"] * v))  # narrow apex, wide base
        th = np.arctan2(v, lu)
        rad = 1 + sum(
            h * np.cos((k + 2) * th + p)
            for k, (h, p) in enumerate(zip(L["harm"], L["phase"], strict=True))
        )
        lung |= lu**2 + v**2 < rad**2
    hx, hy, hax, hay = a["heart"]
    heart = ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 < 1
    lung &= ~heart
    lung_soft = _blur(lung.astype(np.float32), 0.012)
    att -= lung_soft * (a["lung_dark"] - 0.15 * (y - 0.45))  # bases overlap more soft tissue
    att += 0.07 * _blur(heart.astype(np.float32), 0.01)
    y0, gap, curv, width, rib_c = a["ribs"]  # posterior ribs: arcs rising then falling laterally
    xn = np.abs(x - 0.5 - bdx)
    phase = (y - y0 - curv * (xn - 0.1) ** 2) / gap
    frac = phase - np.floor(phase)
    ribs = np.where((phase >= 0) & (phase < 9) & (frac < width), np.sin(np.pi * frac / width), 0)
    ribs *= np.clip((0.45 - xn) * 30, 0, 1) * np.clip((xn - 0.03) * 40, 0, 1) * body
    att += rib_c * ribs * (0.4 + 0.6 * lung_soft)  # ribs stand out less over soft tissue
    sw, sc = a["spine"]
    vert = 0.75 + 0.25 * np.cos(2 * np.pi * y / 0.06)
    att += sc * vert * np.clip((sw - xn) * 200, 0, 1) * body
    lines = np.zeros((s, s), np.float32)
    for pts, c in a["vessels"]:
        cv2.polylines(
            lines,
            [np.round(pts * s * 16).astype(np.int32)],
            False,
            float(c),
            max(1, s // 128),
            cv2.LINE_AA,
            shift=4,
        )
    for lid, lu, lv, r, c in a["nodules"]:
        L = a["lungs"][lid]
        cv2.circle(
            lines,
            (int(s * (L["cx"] + lu * L["ax"])), int(s * (L["cy"] + lv * L["ay"]))),
            max(1, int(r * s)),
            float(c),
            -1,
            cv2.LINE_AA,
        )
    att += _blur(lines, 0.004) * lung_soft
    cy, cdy, cw = a["clavicle"]
    clav = np.zeros((s, s), np.float32)
    for side in (-1, 1):
        p0, p1 = (0.5 + bdx + side * 0.06, cy), (0.5 + bdx + side * cw, cy - cdy)
        cv2.line(
            clav,
            (int(p0[0] * s), int(p0[1] * s)),
            (int(p1[0] * s), int(p1[1] * s)),
            0.12,
            max(1, int(0.025 * s)),
            cv2.LINE_AA,
        )
    att += _blur(clav, 0.006) + a["breast"] * lung_soft * np.clip((y - 0.5) * 8, 0, 1)
    if opacity:
        op = np.zeros((s, s), np.float32)
        for lid, lu, lv, sx, sy, c in a["opacities"]:
            L, grow = a["lungs"][lid], orng.uniform(0.9, 1.2)
            ox = L["cx"] + lu * L["ax"] + orng.normal(0, 0.01)
            oy = L["cy"] + lv * L["ay"] + orng.normal(0, 0.01)
            op += c * np.exp(
                -(((x - ox) / (sx * grow)) ** 2) / 2 - ((y - oy) / (sy * grow)) ** 2 / 2
            )
        tex = _smooth_noise(orng, s, int(orng.integers(6, 12)))
        op = np.minimum(op * np.clip(2.2 * tex - 0.4, 0, 1.2), a["lung_dark"] + 0.03)
        att += op * lung_soft  # capped: consolidation is about as dense as soft tissue
        drawn = op * lung_soft >= OPACITY_LEVEL
    else:
        drawn = np.zeros((s, s), bool)
    # Acquisition: geometry, blur, exposure, gamma, heel-effect gradient, noise.
    m = cv2.getRotationMatrix2D((s / 2, s / 2), u(-6, 6), u(0.94, 1.06))
    m[:, 2] += rng.normal(0, 0.03, 2) * s
    att = cv2.warpAffine(
        _blur(att.astype(np.float32), u(0.002, 0.009)),
        m,
        (s, s),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    mask, region = (
        cv2.warpAffine(b.astype(np.uint8) * 255, m, (s, s), flags=cv2.INTER_NEAREST)
        for b in (lung, drawn)
    )
    lo, hi = u(0.0, 0.15), u(0.7, 1.0)
    heel = 1 + rng.normal(0, 0.08) * (x - 0.5) + rng.normal(0, 0.08) * (y - 0.5)
    img = lo + (hi - lo) * np.clip(att, 0, 1) ** u(0.7, 1.4) * heel
    img += rng.standard_normal((s, s), dtype=np.float32) * u(0.005, 0.03)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), mask, region


def _check(n_patients: int, images_per_patient: int, size: int, prevalence: float) -> None:
    """Reject parameters that would silently give an empty or unusable set."""
    if n_patients < 1 or images_per_patient < 1:
        raise ConfigError(
            f"phantom n_patients={n_patients} and images_per_patient="
            f"{images_per_patient} must both be >= 1"
        )
    if size < 32:
        raise ConfigError(f"phantom size={size} is too small to draw anatomy; use >= 32")
    if not 0.0 <= prevalence <= 1.0:
        raise ConfigError(f"phantom prevalence={prevalence} must be within [0, 1]")


class PhantomImage(NamedTuple):
    """One image of a phantom set: its class folder and file name as `write_phantom` writes
    them, the pixels, the lung mask and the opacity mask (uint8 HxW, masks 0/255)."""

    label: str
    name: str
    image: np.ndarray
    lungs: np.ndarray
    opacity: np.ndarray


def phantom_images(
    n_patients: int = 400,
    images_per_patient: int = 2,
    size: int = 128,
    prevalence: float = 0.5,
    seed: int = 0,
) -> Iterator[PhantomImage]:
    """Every image of the phantom set with these parameters, in patient order.

    What `write_phantom` writes, plus each image's opacity mask (not stored in the cache): a
    test can get where the opacities of a cached image are by iterating with the same
    parameters. Each patient gets its own generator seeded by (seed, pid).
    """
    _check(n_patients, images_per_patient, size, prevalence)
    positive = np.zeros(n_patients, bool)
    positive[
        np.random.default_rng(seed).permutation(n_patients)[: round(prevalence * n_patients)]
    ] = 1
    for pid in range(n_patients):
        rng = np.random.default_rng([seed, pid])
        anatomy = sample_anatomy(rng)
        for k in range(images_per_patient):
            image, lungs, opacity = render_phantom_regions(rng, size, bool(positive[pid]), anatomy)
            label = CLASSES[int(positive[pid])]
            yield PhantomImage(label, f"patient{pid:04d}_{k}.png", image, lungs, opacity)


def write_phantom(
    root: Path,
    n_patients: int = 400,
    images_per_patient: int = 2,
    size: int = 128,
    prevalence: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write root/{NORMAL,OPACITY}/patientNNNN_K.png and root/masks/patientNNNN_K.png (same stem).

    Each patient gets its own generator seeded by (seed, pid), so a patient's images do not depend
    on how many patients come before it (see `phantom_images`).
    """
    _check(n_patients, images_per_patient, size, prevalence)
    root = Path(root)
    for sub in (*CLASSES, "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for item in phantom_images(n_patients, images_per_patient, size, prevalence, seed):
        for path, arr in (
            (root / item.label / item.name, item.image),
            (root / "masks" / item.name, item.lungs),
        ):
            if not cv2.imwrite(str(path), arr):
                raise DataError(f"could not write {path}; check that the disk is writable")
    logger.info(
        "wrote %d phantom images to %s in %.1f s",
        n_patients * images_per_patient,
        root,
        time.perf_counter() - start,
    )
    return root


def ensure_phantom(
    cache_dir: Path | str,
    n_patients: int = 400,
    images_per_patient: int = 2,
    size: int = 128,
    prevalence: float = 0.5,
    seed: int = 0,
) -> Path:
    """Return the cached phantom directory for these parameters, generating it once.

    Directory name encodes the parameters + a generator version constant (bump it when rendering
    changes). Generation writes into a temporary sibling directory and renames it into place, so
    concurrent processes (sweep jobs) never see a half-written set; if the rename loses a race,
    use the winner's.
    """
    _check(n_patients, images_per_patient, size, prevalence)
    cache_dir = Path(cache_dir).expanduser()
    name = (
        f"phantom_v{GENERATOR_VERSION}_n{n_patients}_k{images_per_patient}_s{size}"
        f"_p{prevalence:.6g}_seed{seed}"
    )
    final = cache_dir / name
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        write_phantom(tmp, n_patients, images_per_patient, size, prevalence, seed)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # another process renamed its copy first: use the winner's
            logger.info("phantom %s was generated concurrently; using that copy", final)
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("phantom cached at %s", final)
    return final


class PhantomSource:
    """Mixin for data modules whose root is the cached phantom (classification, segmentation):
    generated once in `prepare_data`, located again on every rank in `resolve_root`."""

    root: Path | None

    def use_phantom(self, cache_dir: Path | str, **params: float) -> None:
        self.phantom_cache = (Path(cache_dir), params)

    def prepare_data(self) -> None:
        self.resolve_root()

    def resolve_root(self) -> Path:
        cache_dir, params = self.phantom_cache
        self.root = ensure_phantom(cache_dir, **params)
        return self.root
