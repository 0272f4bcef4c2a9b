"""The one way medx uses a trained model; every front door is an adapter around it.

`medx.predict` (argv → CSV), `medx.serve` (HTTP → JSON), the MLflow pyfunc (DataFrame →
DataFrame), `medx.export`'s verification and `medx.score` call this package and add only
their transport, so the same image gives the same answer through each of them.

- `Predictor`: a classifier with its calibrated probabilities, the decision at its operating
  point (every threshold with its scale), test-time augmentation, a quality gate, the lungs
  check and Grad-CAM; `.predict(inputs)` for files, bytes or arrays, `.stream(paths)` for
  folders; with a shift reference on the card, each image's out-of-distribution score and
  flag, and the shift test of a folder (`.stream(...).shift_report()`) or of a service's
  recent requests (`.observe`, `.drift`).
- `ShiftMonitor`: the shift monitor (`medx.inference.shift`); `monitor_for(model)` says why a
  model has none.
- `Segmenter`: masks at the image's own size, post-processed as the model was.
- `QualityGate`: a `data=quality` model's verdict on an image.
- `open_model`: a checkpoint, a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI, or an ONNX
  export (`OnnxModel`, onnxruntime).
- `read`, `find_inputs`: reading under the pixel limit with the model's intensity step.

Example:
    >>> from medx.inference import Predictor, find_inputs
    >>> predictor = Predictor.from_checkpoint("run/checkpoints/best.ckpt", tta=True)
    >>> stream = predictor.stream(find_inputs("studies/"))
    >>> for answer in stream:
    ...     print(answer.source, answer.probabilities, answer.decision, answer.ood_score)
    >>> print(stream.shift_report().summary())  # None without a shift reference
"""

from medx.inference.decision import Decision, DecisionRule, check_threshold, to_scale
from medx.inference.onnx_model import OnnxModel, OnnxModelError
from medx.inference.opening import backend_of, is_model_uri, open_model
from medx.inference.predictor import (
    LUNG_SHARE_ALARM,
    Prediction,
    PredictionStream,
    Predictor,
    Prepared,
)
from medx.inference.quality import QC_MODES, Quality, QualityGate
from medx.inference.reading import (
    MAX_PIXELS,
    ModelInput,
    PixelLimitError,
    Source,
    check_size,
    find_inputs,
    read,
)
from medx.inference.segmenter import Segmentation, Segmenter, predict_mask
from medx.inference.shift import ShiftMonitor, ShiftReport, ShiftUnavailable, monitor_for

__all__ = [
    "LUNG_SHARE_ALARM",
    "MAX_PIXELS",
    "QC_MODES",
    "Decision",
    "DecisionRule",
    "ModelInput",
    "OnnxModel",
    "OnnxModelError",
    "PixelLimitError",
    "Prediction",
    "PredictionStream",
    "Predictor",
    "Prepared",
    "Quality",
    "QualityGate",
    "Segmentation",
    "Segmenter",
    "ShiftMonitor",
    "ShiftReport",
    "ShiftUnavailable",
    "Source",
    "backend_of",
    "check_size",
    "check_threshold",
    "find_inputs",
    "is_model_uri",
    "monitor_for",
    "open_model",
    "predict_mask",
    "read",
    "to_scale",
]
