"""Which mixed precision `trainer=gpu` trains in: bfloat16 where the GPU computes in it natively,
float16 otherwise.

bf16 keeps float32's exponent range, so it needs no loss scaling and does not overflow where
fp16 can; Ampere and later GPUs (A100, RTX 30xx, H100/H200) run it at fp16's speed. Older GPUs
(V100, T4) only emulate bf16, slower than their fp16 tensor cores: they get `16-mixed`.
conf/trainer/gpu.yaml asks through the `${medx.mixed_precision:}` resolver, registered when
`medx.config` is imported, so every composed config (train, eval, tests) can resolve it.
"""

from __future__ import annotations

from omegaconf import OmegaConf

RESOLVER = "medx.mixed_precision"


def mixed_precision(bf16: bool | None = None) -> str:
    """Lightning's precision: "bf16-mixed" if `bf16` (None: this machine's GPU has native bf16),
    else "16-mixed"."""
    if bf16 is None:
        import torch  # here, not at import: composing a config needs no CUDA

        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if bf16 else "16-mixed"


def register_resolver() -> None:
    """`${medx.mixed_precision:}` in configs: this machine's choice, resolved when read."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda: mixed_precision())
