"""The code MLflow runs to build a registered medx model ("models from code").

medx.tracking.registry logs this file, not a pickled object, as the model's `python_model`:
loading a registered model then unpickles nothing (as medx loads checkpoints with
weights_only=True).
"""

import mlflow

from medx.tracking.registry import MedxModel

mlflow.models.set_model(MedxModel())
