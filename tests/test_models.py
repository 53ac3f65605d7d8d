"""Built-in architectures, ModelSpec and loading user and torchvision models."""

from __future__ import annotations

import io
import math
import operator
import re
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslcompress.errors import UnsupportedModelError
from sslcompress.models import ModelSpec, build_model, builtin_models, natural_input, torchvision_available

BUILTIN_NAMES = [
    "lenet5",
    "mlp",
    "convnet",
    "resnet20",
    "resnet32",
    "resnet56",
    "vit_tiny",
    "llama_vit_tiny",
    "vit_small",
    "convnext_cifar",
    "alexnet",
    "vgg16",
    "vgg16_bn",
    "resnet18",
    "resnet50",
]

# ImageNet models are exercised at a small input to keep the suite fast (alexnet's minimum is 63).
TEST_SIZE = {
    "vit_small": (32, 32),
    "alexnet": (64, 64),
    "vgg16": (32, 32),
    "vgg16_bn": (32, 32),
    "resnet18": (32, 32),
    "resnet50": (32, 32),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name: str, **kwargs: object) -> nn.Module:
    """Build on the meta device: shapes and parameter counts without memory or init cost."""
    with torch.device("meta"):
        return build_model(ModelSpec(name, **kwargs))  # type: ignore[arg-type]


def test_builtin_models_lists_every_builtin_with_one_line() -> None:
    models = builtin_models()
    assert sorted(models) == sorted(BUILTIN_NAMES)
    for description in models.values():
        assert isinstance(description, str) and description and "\n" not in description


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_builds_runs_and_traces(name: str) -> None:
    channels, size = natural_input(name)
    size = TEST_SIZE.get(name, size)
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, num_classes=10, in_channels=channels, input_size=size))
    x = torch.randn(2, channels, *size)
    assert model(x).shape == (2, 10)

    model.eval()
    graph_module = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x))
    called = Counter(node.target for node in graph_module.graph.nodes if node.op == "call_module")
    reused = [target for target, count in called.items() if count > 1]
    assert not reused, f"modules called more than once: {reused}"


def test_natural_inputs() -> None:
    assert natural_input("lenet5") == (1, (28, 28))
    assert natural_input("mlp") == (1, (28, 28))
    assert natural_input("convnet") == (3, (32, 32))
    assert natural_input("resnet56") == (3, (32, 32))
    assert natural_input("resnet50") == (3, (224, 224))
    assert natural_input("torchvision:mobilenet_v2") == (3, (224, 224))
    assert natural_input("my_models.py:make") == (3, (224, 224))
    with pytest.raises(UnsupportedModelError, match="lenet5"):
        natural_input("lenet6")


def test_resnet18_at_224() -> None:
    model = build_model(ModelSpec("resnet18", num_classes=1000, input_size=(224, 224))).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_small_parameter_counts() -> None:
    # conv1 20*1*25+20 = 520; conv2 50*20*25+50 = 25,050; fc1 800*500+500 = 400,500; fc2 500*10+10 = 5,010
    assert n_params(build_model(ModelSpec("lenet5", in_channels=1, input_size=(28, 28)))) == 431_080
    # 784*500+500 = 392,500; 500*300+300 = 150,300; 300*10+10 = 3,010
    assert n_params(build_model(ModelSpec("mlp", in_channels=1, input_size=(28, 28)))) == 545_810
    # conv1 32*3*25+32 = 2,432; conv2 32*32*25+32 = 25,632; conv3 64*32*25+64 = 51,264; fc 1024*10+10 = 10,250
    assert n_params(build_model(ModelSpec("convnet"))) == 89_578


def test_resnet20_parameter_count() -> None:
    # stem: conv 3*16*9 = 432, BN 2*16 = 32                                    ->     464
    # stage 1, 3 blocks of 2x(16*16*9 + 2*16) = 4,672                          ->  14,016
    # stage 2, first block: 16*32*9 + 64 + 32*32*9 + 64 + 1x1 16*32 + 64 = 14,528;
    #          two more blocks of 2x(32*32*9 + 64) = 18,560                    ->  51,648
    # stage 3, first block: 32*64*9 + 128 + 64*64*9 + 128 + 1x1 32*64 + 128 = 57,728;
    #          two more blocks of 2x(64*64*9 + 128) = 73,984                   -> 205,696
    # fc 64*10 + 10                                                            ->     650
    # total 464 + 14,016 + 51,648 + 205,696 + 650 = 272,474
    assert n_params(build_model(ModelSpec("resnet20"))) == 272_474


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", 11_689_512),
        ("resnet50", 25_557_032),
        ("alexnet", 61_100_840),
        ("vgg16", 138_357_544),
        ("vgg16_bn", 138_365_992),
        ("vit_small", 22_050_664),  # timm's vit_small_patch16_224 (torchvision has no ViT-S)
    ],
)
def test_imagenet_parameter_counts_match_torchvision(name: str, expected: int) -> None:
    assert n_params(build_meta(name, num_classes=1000, input_size=(224, 224))) == expected


@pytest.mark.parametrize(
    ("name", "adds"), [("resnet20", 9), ("resnet56", 27), ("resnet18", 8), ("resnet50", 16)]
)
def test_residual_adds_are_visible_in_the_graph(name: str, adds: int) -> None:
    size = TEST_SIZE.get(name, (32, 32))
    graph = torch.fx.symbolic_trace(build_meta(name, input_size=size)).graph
    found = [n for n in graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(found) == adds


def test_lenet5_has_no_relu_after_convs() -> None:
    model = build_model(ModelSpec("lenet5", in_channels=1, input_size=(28, 28)))
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1
    assert model.fc1.in_features == 800


def test_convnet_ceil_mode_pooling_sizes() -> None:
    model = build_model(ModelSpec("convnet")).eval()
    sizes: list[tuple[int, ...]] = []
    hooks = [
        getattr(model, p).register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
        for p in ("pool1", "pool2", "pool3")
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert sizes == [(16, 16), (8, 8), (4, 4)]
    assert model.fc.in_features == 64 * 4 * 4


def caffe_ave_pool(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """Caffe's PoolingLayer AVE forward with pad 0, written from its C++ loop."""
    _, _, height, width = x.shape
    out_h = int(math.ceil((height - kernel) / stride)) + 1
    out_w = int(math.ceil((width - kernel) / stride)) + 1
    out = np.zeros(x.shape[:2] + (out_h, out_w), dtype=np.float64)
    for ph in range(out_h):
        for pw in range(out_w):
            hstart, wstart = ph * stride, pw * stride
            hend, wend = min(hstart + kernel, height), min(wstart + kernel, width)
            pool_size = (hend - hstart) * (wend - wstart)
            out[:, :, ph, pw] = x[:, :, hstart:hend, wstart:wend].sum(axis=(2, 3)) / pool_size
    return out


@pytest.mark.parametrize("shape", [(32, 32), (16, 16), (8, 8), (9, 12)])
def test_ceil_mode_avgpool_matches_caffe(shape: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    ours = nn.AvgPool2d(kernel_size=3, stride=2, ceil_mode=True)(x)
    np.testing.assert_allclose(ours.numpy(), caffe_ave_pool(x.numpy(), 3, 2), rtol=1e-12, atol=1e-12)


def test_conv_init_is_kaiming_fan_out_and_bn_is_identity() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20"))
    conv = model.layer3[1].conv1
    expected_std = math.sqrt(2.0 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    bn = model.layer3[1].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_resnet18_state_dict_loads_strictly_into_a_fresh_one() -> None:
    source = build_model(ModelSpec("resnet18", num_classes=10)).eval()
    target = build_model(ModelSpec("resnet18", num_classes=10)).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight", "fc.bias"} <= set(
        source.state_dict()
    )


@pytest.mark.parametrize(
    ("name", "size", "minimum"),
    [
        ("lenet5", (8, 8), 16),
        ("lenet5", (8, 64), 16),
        ("alexnet", (16, 16), 63),
        ("vgg16", (16, 16), 32),
        ("convnet", (4, 4), 8),
    ],
)
def test_too_small_input_names_model_and_minimum(name: str, size: tuple[int, int], minimum: int) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"{name}.*{minimum}x{minimum}"):
        build_model(ModelSpec(name, in_channels=1, input_size=size))


@pytest.mark.parametrize(("name", "channels", "side"), [("lenet5", 1, 16), ("convnet", 3, 8)])
def test_minimum_input_builds(name: str, channels: int, side: int) -> None:
    model = build_model(ModelSpec(name, in_channels=channels, input_size=(side, side)))
    assert model(torch.zeros(2, channels, side, side)).shape == (2, 10)


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(UnsupportedModelError, match="lenet5.*resnet50") as info:
        build_model(ModelSpec("resnet21"))
    assert "resnet21" in str(info.value)


# --- ModelSpec -------------------------------------------------------------------------------------


def test_spec_round_trip_through_a_weights_only_checkpoint() -> None:
    spec = ModelSpec("resnet20", num_classes=100, in_channels=3, input_size=(40, 36))
    d = spec.to_dict()
    assert d == {"name": "resnet20", "num_classes": 100, "in_channels": 3, "input_size": [40, 36]}
    buffer = io.BytesIO()
    torch.save({"model_spec": d}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["model_spec"]
    assert ModelSpec.from_dict(loaded) == spec
    assert spec.input_shape == (1, 3, 40, 36)


def test_spec_from_dict_fills_defaults_and_normalises_lists() -> None:
    assert ModelSpec.from_dict({"name": "convnet"}) == ModelSpec("convnet")
    assert ModelSpec("mlp", input_size=[28, 28]).input_size == (28, 28)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        [],
        "resnet20",
        {},
        {"name": 3},
        {"name": ""},
        {"name": "convnet", "num_classes": 0},
        {"name": "convnet", "num_classes": "10"},
        {"name": "convnet", "in_channels": True},
        {"name": "convnet", "input_size": "32x32"},
        {"name": "convnet", "input_size": [32]},
        {"name": "convnet", "input_size": [32, -1]},
        {"name": "convnet", "input_size": [32.0, 32.0]},
    ],
)
def test_spec_from_garbage_raises(garbage: object) -> None:
    with pytest.raises(UnsupportedModelError):
        ModelSpec.from_dict(garbage)  # type: ignore[arg-type]


# --- user models -----------------------------------------------------------------------------------

USER_MODULE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1)
        return self.fc(x)


def make(num_classes, in_channels):
    return Tiny(num_classes, in_channels)


def make_fixed():
    return Tiny(7, 3)


def make_any(**kwargs):
    make_any.seen = kwargs
    return Tiny(kwargs["num_classes"], kwargs["in_channels"])


def boom(num_classes):
    raise RuntimeError("no weights for you")


def not_a_module():
    return {"conv": 1}


constant = 3
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    return path


def test_user_file_factory_gets_the_keywords_it_accepts(user_file: Path) -> None:
    model = build_model(ModelSpec(f"{user_file}:make", num_classes=5, in_channels=2))
    assert model(torch.randn(2, 2, 8, 8)).shape == (2, 5)


def test_user_file_factory_without_parameters(user_file: Path) -> None:
    model = build_model(ModelSpec(f"{user_file}:make_fixed", num_classes=5))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 7)


def test_user_factory_with_var_keywords_gets_everything(user_file: Path) -> None:
    model = build_model(ModelSpec(f"{user_file}:make_any", num_classes=4, input_size=(8, 9)))
    module = sys.modules[type(model).__module__]
    assert module.make_any.seen == {"num_classes": 4, "in_channels": 3, "input_size": (8, 9)}


def test_user_class_as_factory(user_file: Path) -> None:
    model = build_model(ModelSpec(f"{user_file}:Tiny", num_classes=6, in_channels=1))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 6)


def test_user_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "sslc_test_userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelSpec("sslc_test_userpkg.nets:make", num_classes=3))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    for name in ("sslc_test_userpkg", "sslc_test_userpkg.nets"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("attr", "cause"),
    [
        ("missing", "no attribute"),
        ("boom", "no weights for you"),
        ("not_a_module", "not a torch.nn.Module"),
        ("constant", "not callable"),
    ],
)
def test_user_factory_errors_name_the_spec(user_file: Path, attr: str, cause: str) -> None:
    name = f"{user_file}:{attr}"
    with pytest.raises(UnsupportedModelError, match=re.escape(name)) as info:
        build_model(ModelSpec(name))
    assert cause in str(info.value)
    if attr == "boom":
        assert isinstance(info.value.__cause__, RuntimeError)


def test_user_missing_file(tmp_path: Path) -> None:
    name = f"{tmp_path / 'nowhere.py'}:make"
    with pytest.raises(UnsupportedModelError, match=re.escape(name)):
        build_model(ModelSpec(name))


def test_user_file_that_fails_to_import(tmp_path: Path) -> None:
    path = tmp_path / "broken.py"
    path.write_text("import torch\nraise ImportError('needs a GPU library')\n")
    name = f"{path}:make"
    with pytest.raises(UnsupportedModelError, match=re.escape(name)) as info:
        build_model(ModelSpec(name))
    assert "needs a GPU library" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_user_module_that_does_not_exist() -> None:
    name = "sslc_no_such_package.models:make"
    with pytest.raises(UnsupportedModelError, match=re.escape(name)) as info:
        build_model(ModelSpec(name))
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


# --- torchvision -----------------------------------------------------------------------------------


@pytest.mark.skipif(not torchvision_available(), reason="torchvision is not importable")
def test_torchvision_resnet18_builds_and_matches_builtin_layout() -> None:
    model = build_model(ModelSpec("torchvision:resnet18", num_classes=10, input_size=(64, 64)))
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    ours = build_model(ModelSpec("resnet18", num_classes=10, input_size=(64, 64)))
    ours.load_state_dict(model.state_dict(), strict=True)


def test_torchvision_missing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    assert not torchvision_available()
    with pytest.raises(UnsupportedModelError, match="torchvision.*not importable"):
        build_model(ModelSpec("torchvision:resnet18"))


def test_within_channel_lrn_matches_caffe_formula() -> None:
    """Caffe WITHIN_CHANNEL: x / (1 + alpha/size^2 * sum of x^2 over a zero-padded size x size window)^beta."""
    import numpy as np

    from sslcompress.models.small import WithinChannelLRN

    x = torch.randn(2, 3, 7, 6, dtype=torch.float64) * 30
    size, alpha, beta = 3, 5e-5, 0.75
    xn = x.numpy()
    padded = np.pad(xn * xn, ((0, 0), (0, 0), (1, 1), (1, 1)))
    window = sum(padded[:, :, i:i + 7, j:j + 6] for i in range(size) for j in range(size))
    expected = xn / (1 + alpha / size**2 * window) ** beta
    got = WithinChannelLRN(size, alpha, beta)(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # A zero channel stays zero and does not change its neighbours: channels can be deleted exactly.
    x[:, 1] = 0
    y = WithinChannelLRN(size, alpha, beta)(x)
    assert bool((y[:, 1] == 0).all())
    torch.testing.assert_close(y[:, [0, 2]], WithinChannelLRN(size, alpha, beta)(x[:, [0, 2]]))


def test_convnet_channels_pass_through_within_channel_lrn() -> None:
    from sslcompress.finetune.structure import analyze

    st = analyze(build_model(ModelSpec("convnet")), (1, 3, 32, 32))
    assert set(st.pinned.values()) == {"model input", "model output"}
    conv1, conv2 = st.layers["conv1"], st.layers["conv2"]
    assert [st.root(i) for i in conv2.in_ids] == [st.root(i) for i in conv1.out_ids]


def test_inputs_below_the_smallest_side_are_refused_with_it() -> None:
    # Sizes other than the designed one are tried on the meta device first; the designed one skips that.
    with pytest.raises(UnsupportedModelError, match="needs inputs of at least 63x63 pixels, got 32x32"):
        build_model(ModelSpec("alexnet", input_size=(32, 32)))
    with pytest.raises(UnsupportedModelError, match="needs inputs of at least"):
        build_model(ModelSpec("lenet5", input_size=(8, 8)))
    with torch.no_grad():
        assert build_model(ModelSpec("lenet5", in_channels=1, input_size=(32, 32)))(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
        assert build_model(ModelSpec("lenet5", in_channels=1, input_size=(28, 28)))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
