"""The service's command line is made from ServeConfig: every setting is a flag of both entry points."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.params import ParamError
from serving.config import ServeConfig, command_line, configured


def test_every_setting_has_a_flag_with_its_type_and_help():
    parser = command_line("serving", None, "models/model.onnx")
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(ServeConfig):
        assert f.name in flags, f"ServeConfig.{f.name} has no flag"
        assert f"serve.{f.name}" in flags[f.name].help and f.metadata["help"] in flags[f.name].help
    args = parser.parse_args(["--max-batch", "7", "--no-batching", "--body-timeout-s", "2.5", "--provider", "cuda"])
    cfg = configured(ServeConfig(port=9000), args)
    assert (cfg.max_batch, cfg.batching, cfg.body_timeout_s, cfg.provider) == (7, False, 2.5, "cuda")
    assert cfg.port == 9000  # not given: the base's value stays


def test_a_flag_not_given_keeps_the_params_value_and_a_bad_value_is_refused():
    parser = command_line("serving", None, "m.onnx")
    assert configured(ServeConfig(max_batch=5), parser.parse_args([])) == ServeConfig(max_batch=5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--provider", "tpu"])
    with pytest.raises(ParamError, match="serve.max_batch=0 is not allowed"):
        configured(ServeConfig(), parser.parse_args(["--max-batch", "0"]))
