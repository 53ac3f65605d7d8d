"""The Python API refuses bad arguments with the package's own errors, as the CLI does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sslcompress.errors import CheckpointError, ConfigError, DataError, UnsupportedModelError
from sslcompress.finetune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sslcompress.finetune.groups import build_groups
from sslcompress.finetune.masks import MaskSet
from sslcompress.finetune.regularizer import GroupLasso
from sslcompress.models import ModelSpec, build_model
from sslcompress.surgery.compress import compress
from sslcompress.surgery.export import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = ModelSpec("lenet5", 10, 1, (28, 28))
SHAPE = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model(SPEC)


@pytest.fixture(scope="module")
def lasso(lenet):
    return GroupLasso(lenet, build_groups(lenet, SHAPE, ("filter",)))


@pytest.mark.parametrize("kinds", [("filtr",), "filtr", (), ("filter", "kernel")])
def test_unknown_kinds_refused(lenet, kinds):
    with pytest.raises(ConfigError, match="group kind"):
        build_groups(lenet, SHAPE, kinds=kinds)


def test_kinds_as_text_parsed(lenet):
    assert {"filter", "channel", "shape"} <= {g.kind for g in build_groups(lenet, SHAPE, kinds="all")}


@pytest.mark.parametrize("model, shape, error", [
    ("not a model", SHAPE, UnsupportedModelError),
    (None, SHAPE, UnsupportedModelError),
])
def test_build_groups_wrong_model(model, shape, error):
    with pytest.raises(error, match="torch.nn.Module"):
        build_groups(model, shape)


@pytest.mark.parametrize("shape", [(1, 1, 0, 28), "1,1,28,28", (1, 1, 28.0, 28), ()])
def test_build_groups_bad_shape(lenet, shape):
    with pytest.raises(UnsupportedModelError, match="input shape"):
        build_groups(lenet, shape)


@pytest.mark.parametrize("lam", [-1, math.nan, math.inf, "0.1", None])
def test_bad_lambda_refused_and_weights_kept(lenet, lasso, lam):
    before = {n: p.detach().clone() for n, p in lenet.named_parameters()}
    with pytest.raises(ConfigError, match="lambda of filter"):
        lasso.proximal_step(0.1, {"filter": lam})
    with pytest.raises(ConfigError, match="lambda of filter"):
        lasso.penalty({"filter": lam})
    assert all(torch.equal(before[n], p) for n, p in lenet.named_parameters())


def test_unknown_lambda_kind_and_bad_lr(lasso):
    with pytest.raises(ConfigError, match="unknown group kind"):
        lasso.proximal_step(0.1, {"filtr": 1.0})
    with pytest.raises(ConfigError, match="learning rate"):
        lasso.proximal_step(-0.1, {"filter": 1.0})
    with pytest.raises(ConfigError, match="lambdas must map"):
        lasso.penalty(0.1)


def test_group_lasso_arguments(lenet):
    groups = build_groups(lenet, SHAPE, ("filter",))
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        GroupLasso("model", groups)
    with pytest.raises(ConfigError, match="list of groups"):
        GroupLasso(lenet, None)
    with pytest.raises(ConfigError, match="ParamGroup"):
        GroupLasso(lenet, ["filter"])
    other = build_groups(build_model(ModelSpec("resnet20", 10, 3, (32, 32))), (1, 3, 32, 32), ("filter",))
    with pytest.raises(ConfigError, match="lacks"):
        GroupLasso(lenet, other)


def test_mask_set_arguments(lenet):
    with pytest.raises(ConfigError, match="must be a tensor"):
        MaskSet(lenet, {"conv1.weight": "x"})
    with pytest.raises(ConfigError, match="has shape"):
        MaskSet(lenet, {"conv1.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="lacks"):
        MaskSet(lenet, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        MaskSet(None, {})


@pytest.mark.parametrize("change, match", [
    ({"config": {"path": Path("x")}}, r"config\['path'\] is a PosixPath|WindowsPath"),
    ({"metrics": {"acc": __import__("numpy").float64(0.5)}}, "float64"),
    ({"report": {"f": len}}, "builtin_function"),
    ({"kind": "bogus"}, "kind"),
    ({"model": "lenet5"}, "ModelSpec"),
    ({"state_dict": {"w": 1}}, "state_dict"),
    ({"masks": {"nope": torch.ones(1, dtype=torch.bool)}}, "lacks"),
])
def test_save_refuses_what_load_refuses(tmp_path, lenet, change, match):
    fields = {"kind": "sparse", "model": SPEC, "state_dict": lenet.state_dict()} | change
    path = tmp_path / "c.pt"
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(path, Checkpoint(**fields))
    assert not path.exists()


def test_nested_data_checked_plain_data_round_trips(tmp_path, lenet):
    path = tmp_path / "c.pt"
    with pytest.raises(CheckpointError, match=r"report\['a'\]\[1\]\['b'\] is a PosixPath"):
        save_checkpoint(path, Checkpoint("sparse", SPEC, lenet.state_dict(), report={"a": [1, {"b": Path("x")}]}))
    save_checkpoint(path, Checkpoint("sparse", SPEC, lenet.state_dict(),
                                     config={"t": (1, 2), "s": {3}, "n": None, 4: [1.5, "x"]}))
    assert load_checkpoint(path).config["t"] == (1, 2)


@pytest.fixture(scope="module")
def proto(lenet):
    return export_onnx(lenet, SHAPE).model


@pytest.mark.parametrize("rtol", [math.inf, math.nan, 0, -1e-4])
def test_compress_rtol_range(proto, rtol):
    with pytest.raises(ConfigError, match="rtol_of_max"):
        compress(proto, rtol_of_max=rtol)


def test_compress_argument_types(lenet, proto):
    with pytest.raises(UnsupportedModelError, match="onnx.ModelProto"):
        compress(42)
    with pytest.raises(UnsupportedModelError, match=r"pass its \.model"):
        compress(export_onnx(lenet, SHAPE))
    with pytest.raises(ConfigError, match="must be a number"):
        compress(proto, rtol_of_max="1e-4")
    with pytest.raises(DataError, match="list of batches"):
        compress(proto, inputs=5)
