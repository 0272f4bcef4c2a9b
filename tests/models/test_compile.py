"""`model.compile=true`: the network trained through torch.compile, checkpoints unchanged, and a
compilation that fails named by its key with the way out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
import torch._inductor.config
from hydra.utils import instantiate

from medx.config import compose
from medx.errors import ConfigError
from medx.models.base import compile_errors
from medx.models.load import load
from medx.train import train


def test_compile_key_reaches_the_model_and_defaults_off():
    for choice in ("resnet18", "unet"):
        assert compose([f"model={choice}"]).model.compile is False
    cfg = compose(["model.compile=true", "model.backbone=test_resnet"])
    model = instantiate(cfg.model, num_classes=2, _convert_="object")
    assert model.hparams.compile is True and not model.compiled  # compiled when fitting only


def test_a_compile_error_names_the_key_and_the_way_out():
    def breaks_the_graph(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()  # fullgraph=True cannot compile this: a real Dynamo error
        return x + 1

    expected = r"model\.compile=true.*Set model\.compile=false"
    with pytest.raises(ConfigError, match=expected), compile_errors():
        torch.compile(breaks_the_graph, fullgraph=True)(torch.ones(2))


def test_other_errors_pass_through_unchanged():
    with pytest.raises(ValueError, match="not a compile error"), compile_errors():
        raise ValueError("not a compile error")


@pytest.mark.slow  # Inductor compiles C++ kernels: minutes on 2 CPUs without its cache
def test_a_short_run_trains_the_compiled_network(make_cfg, tmp_path: Path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = make_cfg("model.compile=true", "trainer.max_epochs=1", "eval.bootstrap=20")

    metrics = train(cfg)

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert 0.0 <= metrics["val/auroc"] <= 1.0 and "test/auroc" in metrics
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")
    model = load(best)  # plain parameter names: the compiled wrapper is not in the checkpoint
    assert not any("_orig_mod" in k for k in model.state_dict())
    assert model.hparams.compile is True
    with torch.inference_mode():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2)


def test_a_run_whose_compilation_fails_says_how_to_turn_it_off(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing cached
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    torch._dynamo.reset()
    cfg = make_cfg("model.compile=true", "trainer.max_epochs=1")

    with pytest.raises(ConfigError) as error:
        train(cfg)

    message = str(error.value)
    assert "model.compile=true" in message and "model.compile=false" in message
    assert "C++ compiler" in message  # what went wrong, in one line
