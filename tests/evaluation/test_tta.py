"""Test-time augmentation: chest-X-ray-safe views (never a flip), averaged in probability."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medx.errors import ConfigError
from medx.evaluation.tta import (
    DEFAULT_VIEWS,
    IDENTITY,
    TestTimeAugmentation,
    View,
    tta_logits,
    tta_probs,
)
from medx.models.classifier import ClassificationModule


def heart_on_the_right(n: int = 2, size: int = 64) -> torch.Tensor:
    """A left-right asymmetric [0, 1] batch: a bright blob right of centre, a dark left."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    blob = torch.exp(-((x - 0.68) ** 2 + (y - 0.6) ** 2) / 0.02)
    image = (0.2 + 0.7 * blob + 0.1 * x).clamp(0, 1)
    return image.expand(n, 3, size, size).contiguous()


class Brightness(nn.Module):
    """A fixed two-class 'model': the positive logit grows with the mean brightness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 20 * (x.mean(dim=(1, 2, 3)) - 0.3)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def tiny() -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule(backbone="test_resnet", num_classes=2).eval()


@pytest.mark.parametrize("view", DEFAULT_VIEWS, ids=[v.name for v in DEFAULT_VIEWS])
def test_no_view_mirrors_the_image(view: View):
    x = heart_on_the_right()
    seen = view(x)

    def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    assert seen.shape == x.shape
    assert agreement(seen, x) > 0.9 > agreement(seen, x.flip(-1))
    right, left = seen[..., 32:].mean(), seen[..., :32].mean()
    assert right > left + 0.05  # the bright side stays on the right


def test_geometric_views_move_content_the_way_they_say():
    dot = torch.zeros(1, 1, 41, 41)
    dot[..., 10, 10] = 1  # up-left of the centre (20, 20)

    def where(x: torch.Tensor) -> tuple[int, int]:
        return divmod(int(x.flatten().argmax()), 41)

    assert where(View("s", shift=(0.1, 0.0))(dot)) == (10, 14)  # 10 % of 41 px to the right
    assert where(View("s", shift=(0.0, -0.1))(dot)) == (6, 10)  # up
    row, col = where(View("z", zoom=1.5)(dot))
    assert row < 10 and col < 10  # magnified about the centre: away from it
    row, col = where(View("z", zoom=0.75)(dot))
    assert row > 10 and col > 10  # shrunk: towards it


def test_exposure_views_keep_the_range_and_the_ends():
    x = torch.linspace(0, 1, 11).view(1, 1, 1, 11)
    brighter, darker = View("b", gamma=0.8)(x), View("d", gamma=1.25)(x)
    assert torch.all(brighter[..., 1:-1] > x[..., 1:-1])
    assert torch.all(darker[..., 1:-1] < x[..., 1:-1])
    for seen in (brighter, darker):
        assert seen[..., 0] == 0 and seen[..., -1] == 1


def test_identity_only_tta_is_the_plain_prediction():
    module, x = tiny(), heart_on_the_right(4)
    with torch.no_grad():
        plain = torch.softmax(module(x), dim=1)
        assert IDENTITY(x) is x
        assert torch.equal(tta_probs(module, x, [IDENTITY]), plain)
        torch.testing.assert_close(torch.softmax(tta_logits(module, x, [IDENTITY]), 1), plain)


def test_probabilities_are_averaged_not_logits():
    model, x = Brightness(), heart_on_the_right(3)
    views = [IDENTITY, View("much_darker", gamma=3.0)]
    each = [torch.softmax(model(v(x)), dim=1) for v in views]

    probs = tta_probs(model, x, views)

    torch.testing.assert_close(probs, (each[0] + each[1]) / 2)
    softmax_of_mean_logits = torch.softmax((model(x) + model(views[1](x))) / 2, dim=1)
    assert (probs - softmax_of_mean_logits).abs().max() > 0.05  # the two rules differ here
    torch.testing.assert_close(torch.softmax(tta_logits(model, x, views), dim=1), probs)


def test_the_default_views_are_deterministic_and_change_the_prediction_a_little():
    module, x = tiny(), heart_on_the_right(4)
    with torch.no_grad():
        first, second = tta_probs(module, x), tta_probs(module, x)
        plain = torch.softmax(module(x), dim=1)
    assert torch.equal(first, second)
    assert not torch.equal(first, plain) and (first - plain).abs().max() < 0.2
    torch.testing.assert_close(first.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    "bad",
    [{"zoom": -1.0}, {"zoom": 0.0}, {"shift": (0.5, 0.0)}, {"gamma": 0.0}],
    ids=["negative zoom (a flip)", "zero zoom", "half-image shift", "zero gamma"],
)
def test_views_that_are_not_small_are_config_errors(bad: dict):
    with pytest.raises(ConfigError, match="TTA view 'bad'"):
        View("bad", **bad)


def test_no_views_is_a_config_error():
    with pytest.raises(ConfigError, match="at least one view"):
        tta_probs(Brightness(), heart_on_the_right(), [])


def test_the_wrapper_tests_in_lightning_like_a_model(tmp_path: Path):
    module, x = tiny(), heart_on_the_right(8)
    y = torch.tensor([0, 1] * 4)
    wrapped = TestTimeAugmentation(module, num_classes=2)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )

    (metrics,) = trainer.test(wrapped, DataLoader(TensorDataset(x, y), batch_size=4))

    assert {"test/auroc", "test/sensitivity", "test/loss"} <= set(metrics)
    with torch.no_grad():
        expected = torch.nn.functional.nll_loss(tta_logits(module, x), y)
    assert metrics["test/loss"] == pytest.approx(float(expected), abs=1e-5)
