"""medx: medical image deep learning experiments on Lightning + Hydra + MLflow."""

__version__ = "0.1.0"
