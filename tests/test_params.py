import pytest

from pipeline import params
from pipeline.data import DownloadConfig
from pipeline.export import ExportConfig
from pipeline.model import ModelConfig
from pipeline.train import TrainConfig


def test_defaults_parse_from_empty_section():
    assert params.parse(TrainConfig, None, "train") == TrainConfig()


def test_values_are_coerced_where_yaml_is_ambiguous():
    cfg = params.parse(TrainConfig, {"lr": "1e-3", "weight_decay": 0}, "train")
    assert cfg.lr == 0.001 and isinstance(cfg.weight_decay, float)
    assert params.parse(ModelConfig, {"channels": [16, 32]}, "model").channels == (16, 32)


@pytest.mark.parametrize("cls,where,section,message", [
    (TrainConfig, "train", {"epoch": 3}, "unknown key train.epoch (allowed keys: batch_size, checkpoint_every, device"),
    (TrainConfig, "train", {"epochs": "three"}, "train.epochs='three' has the wrong type: expected an integer"),
    (TrainConfig, "train", {"epochs": True}, "train.epochs=True has the wrong type"),
    (TrainConfig, "train", {"lr": -0.1}, "train.lr=-0.1 is not allowed: a learning rate > 0"),
    (TrainConfig, "train", {"batch_size": 0}, "train.batch_size=0 is not allowed: a whole number >= 1"),
    (TrainConfig, "train", {"device": "tpu"}, "train.device='tpu' is not allowed: one of 'auto', 'cpu', 'cuda'"),
    (ModelConfig, "model", {"channels": []}, "model.channels=[] is not allowed"),
    (ModelConfig, "model", {"channels": [32, "x"]}, "model.channels[1]='x' has the wrong type"),
    (ModelConfig, "model", {"dropout": 1.0}, "model.dropout=1.0 is not allowed: a probability in [0, 1)"),
    (ModelConfig, "model", {"padding": "full"}, "model.padding='full' is not allowed"),
    (ModelConfig, "model", {"kernel": 3, "padding": "valid", "channels": [16, 32]},
     "model: this architecture does not fit a 28x28 image: pool2 on 11x11x32: stride 2 does not tile"),
    (ModelConfig, "model", {"channels": [8, 8, 8]}, "pool3 on 7x7x8: stride 2 does not tile the input: "
     "(7 - 2 + 2*0)/2 + 1 = 3.5 is not a whole number"),
    (ModelConfig, "model", {"channels": [8, 8, 8], "padding": "valid"},
     "conv3 on 4x4x8: window 5 is larger than the padded input 4"),
    (DownloadConfig, "download", {"mirrors": []}, "download.mirrors=[] is not allowed: at least one mirror"),
    (DownloadConfig, "download", {"timeout_s": 0}, "download.timeout_s=0.0 is not allowed"),
    (ExportConfig, "export", {"example_batch": 1}, "export.example_batch=1 is not allowed"),
    (TrainConfig, "train", ["epochs", 3], "train must be a mapping"),
])
def test_bad_params_are_refused_with_key_value_and_rule(cls, where, section, message):
    with pytest.raises(params.ParamError) as e:
        params.parse(cls, section, where)
    assert message in str(e.value)


def test_flatten():
    assert params.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 2}) == {"a.b": 1, "a.c.d": [1, 2], "e": 2}
