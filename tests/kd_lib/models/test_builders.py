from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lib.config import ConfigError
from kd_lib.models.builders import MODELS, build_model, cnn, count_parameters, mlp
from kd_lib.plugins import UnknownNameError


def test_registry_has_the_builtin_architectures() -> None:
    assert {"mlp", "cnn"} <= set(MODELS.names())


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (64,)])
def test_mlp_maps_any_shape_to_logits(shape: tuple[int, ...]) -> None:
    model = build_model("mlp", {"width": 16, "depth": 2}, shape, 10)
    assert model(torch.randn(3, *shape)).shape == (3, 10)


def test_mlp_depth_zero_is_logistic_regression() -> None:
    model = mlp((64,), 10, depth=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 64
    assert count_parameters(model) == 64 * 10 + 10


def test_mlp_dropout_adds_dropout_layers_only_when_positive() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in mlp((4,), 2, depth=2).modules())
    assert sum(isinstance(m, nn.Dropout) for m in mlp((4,), 2, depth=2, dropout=0.5).modules()) == 2


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 5, 7)])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_cnn_shapes(shape: tuple[int, int, int], depth: int) -> None:
    model = cnn(shape, 10, channels=4, depth=depth, hidden=8)
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4 * 2**i for i in range(depth)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_cnn_stops_pooling_at_one_pixel() -> None:
    # 8x8 pools to 4, 2, 1 and then stays at 1: three pools for four blocks.
    model = cnn((1, 8, 8), 3, channels=2, depth=4)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3


def test_count_parameters_matches_hand_count() -> None:
    model = mlp((8,), 3, width=5, depth=1)
    assert count_parameters(model) == (8 * 5 + 5) + (5 * 3 + 3)


def test_unknown_arch_lists_available() -> None:
    with pytest.raises(UnknownNameError, match="model 'resnet9000'.*cnn.*mlp.*textcnn, transformer"):
        build_model("resnet9000", {}, (64,), 10)


def test_unknown_param_names_arch_param_and_accepted() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("mlp", {"widht": 32}, (64,), 10)
    message = str(info.value)
    assert "'mlp'" in message and "widht" in message
    assert "width, depth, dropout" in message


@pytest.mark.parametrize(
    ("arch", "params", "shape", "needle"),
    [
        ("mlp", {"width": 0}, (64,), "width"),
        ("mlp", {"dropout": 1.5}, (64,), "dropout"),
        ("mlp", {"depth": "two"}, (64,), "depth"),
        ("cnn", {}, (64,), "(C, H, W)"),
    ],
)
def test_invalid_params_raise_config_error(arch: str, params: dict, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(arch, params, shape, 10)
    assert needle in str(info.value) and f"'{arch}'" in str(info.value)
    assert "accepted parameters" in str(info.value)


def test_float_shapes_from_json_are_accepted() -> None:
    model = build_model("cnn", {"channels": 2, "depth": 1, "hidden": 4}, (1.0, 8.0, 8.0), 3.0)  # type: ignore[arg-type]
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 3)


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "kdtest_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def linear(input_shape, num_classes, bias=True):
                return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_classes, bias=bias))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "kdtest_userpkg.nets"


def test_user_model_by_import_path(user_package: str) -> None:
    model = build_model(f"{user_package}:linear", {"bias": False}, (6,), 4)
    assert model(torch.randn(2, 6)).shape == (2, 4)
    assert count_parameters(model) == 24


def test_user_model_bad_param_and_bad_paths(user_package: str) -> None:
    with pytest.raises(ConfigError, match="unknown parameter.*width.*accepted parameters: bias"):
        build_model(f"{user_package}:linear", {"width": 3}, (6,), 4)
    with pytest.raises(ConfigError, match="no function 'nope'"):
        build_model(f"{user_package}:nope", {}, (6,), 4)
    with pytest.raises(ConfigError, match="cannot import module 'kdtest_missing_pkg.nets'"):
        build_model("kdtest_missing_pkg.nets:linear", {}, (6,), 4)


def test_for_data_renormalizes_only_when_the_statistics_differ() -> None:
    from kd_lib.models.builders import Renormalized, for_data

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    raw = torch.randn(4, 3) * 5 + 2
    theirs, ours = {"mean": 2.0, "std": 5.0}, {"mean": 1.0, "std": 3.0}
    assert for_data(model, ours, ours) is model
    wrapped = for_data(model, theirs, ours)
    assert isinstance(wrapped, Renormalized)
    # Fed our normalization of the raw data, it computes what the model gives on its own.
    with torch.no_grad():
        assert torch.allclose(wrapped((raw - 1.0) / 3.0), model((raw - 2.0) / 5.0), atol=1e-5)


def test_renormalized_handles_per_channel_statistics() -> None:
    from kd_lib.models.builders import for_data

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, 1)
    raw = torch.rand(2, 3, 4, 4) * 255
    theirs = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 50.0, 40.0]}
    ours = {"mean": 115.0, "std": 55.0}
    t_mean, t_std = torch.tensor(theirs["mean"]).view(3, 1, 1), torch.tensor(theirs["std"]).view(3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(
            for_data(model, theirs, ours)((raw - 115.0) / 55.0), model((raw - t_mean) / t_std), atol=1e-4
        )
