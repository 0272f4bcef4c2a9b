"""`python -m medx.predict CKPT INPUT_DIR OUTPUT_DIR`: masks from a segmentation checkpoint.

Each image is resized to the size the model was trained at, segmented, and its probability
map resized back to the image's own size before thresholding (and the model's
`postprocess`), so every mask PNG (0/255, same file stem) lies exactly on its image, whatever
its size or format.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from medx.data.io import list_images, read_image, verify_images
from medx.errors import DataError, MedxError
from medx.models.postprocess import POSTPROCESS, make_postprocess
from medx.models.segmentation import SegmentationModule

log = logging.getLogger(__name__)


def load_segmenter(ckpt_path: str | Path) -> SegmentationModule:
    """The trained module of a medx segmentation checkpoint, on CPU, in eval mode."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise DataError(f"Checkpoint {path} does not exist.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "arch" not in hparams or "encoder" not in hparams:
        raise DataError(
            f"{path} is not a medx segmentation checkpoint (no model.arch/model.encoder in its "
            "hyperparameters); train one with `python -m medx.train model=unet data=lung_seg`."
        )
    # The weights come from the checkpoint: no download, no local encoder file needed.
    hparams.update(pretrained=False, weights=None)
    model = SegmentationModule(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


@torch.no_grad()
def predict_mask(model: SegmentationModule, image: np.ndarray, threshold: float) -> np.ndarray:
    """HxWx3 uint8 image → HxW uint8 mask of 0/255 at the image's own size."""
    size = model.hparams.image_size
    h, w = image.shape[:2]
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(small).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(model.mean)[:, None, None]
    std = torch.tensor(model.std)[:, None, None]
    prob = model.predict_masks(((x - mean) / std)[None])[0, 0].numpy()
    prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = np.where(prob >= threshold, 255, 0).astype(np.uint8)
    return model.postprocess(mask) if model.postprocess else mask


def predict_folder(
    ckpt_path: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    threshold: float | None = None,
    skip_bad_images: bool = False,
    postprocess: str | None = None,
) -> list[Path]:
    """Write `output_dir/<stem>.png` for every image in `input_dir`; returns the mask paths.
    `threshold` and `postprocess` (a `model.postprocess` name) default to the checkpoint's."""
    model = load_segmenter(ckpt_path)
    threshold = model.threshold if threshold is None else threshold
    if postprocess is not None:
        model.postprocess = make_postprocess(postprocess)
    images = verify_images(list_images(Path(input_dir)), skip_bad=skip_bad_images)
    if not images:
        raise DataError(f"{input_dir} holds no images (.png/.jpg/.jpeg/...).")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        mask = predict_mask(model, read_image(path), threshold)
        target = out / f"{path.stem}.png"
        if not cv2.imwrite(str(target), mask):
            raise DataError(f"Could not write {target}; check that the folder is writable.")
        written.append(target)
    log.info("Wrote %d masks to %s", len(written), out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medx.predict", description=__doc__)
    parser.add_argument("ckpt_path", help="a segmentation checkpoint (outputs/.../checkpoints)")
    parser.add_argument("input_dir", help="folder of images (PNG/JPEG/..., any size)")
    parser.add_argument("output_dir", help="where <stem>.png masks (0/255) are written")
    parser.add_argument("--threshold", type=float, help="default: the model's (0.5)")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable files")
    parser.add_argument(
        "--postprocess", choices=list(POSTPROCESS), help="default: the model's model.postprocess"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = predict_folder(
            args.ckpt_path,
            args.input_dir,
            args.output_dir,
            args.threshold,
            args.skip_bad_images,
            args.postprocess,
        )
    except MedxError as err:
        sys.exit(f"medx: {err}")
    print(f"{len(paths)} masks written to {args.output_dir}")


if __name__ == "__main__":
    main()
