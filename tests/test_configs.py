"""The typed configs of build-index and audit (pipeline/config.py): the command line, the keyword
API and the defaults are one declaration. Pure Python: no Ray, no files."""

import argparse

import pytest

from spellshield.jobs.cli import Parser
from spellshield.pipeline.config import (DEFAULT_SHARD_SIZE, AuditConfig, BuildConfig, ConfigError, EncodeConfig,
                                         GateConfig)


def parse(config_cls, argv):
    parser = Parser(prog="test")
    config_cls.add_arguments(parser)
    return config_cls.from_args(parser.parse_args(argv))


def test_build_config_from_the_command_line_equals_the_keyword_api():
    argv = ["--corpus", "s3://bucket/train-{000..009}.tar", "--out", "idx", "--resolution", "8", "--dtype", "float16",
            "--shard-size", "500"]
    config = parse(BuildConfig, argv)
    assert config == BuildConfig.build("s3://bucket/train-{000..009}.tar", "idx", resolution=8, dtype="float16",
                                       shard_size=500)
    assert config.corpus == "s3://bucket/train-{000..009}.tar"  # paths stay plain strings: URIs pass through
    assert config == BuildConfig("s3://bucket/train-{000..009}.tar", "idx", EncodeConfig(resolution=8, dtype="float16"), 500)


def test_build_defaults_are_the_fields_defaults():
    config = parse(BuildConfig, ["--corpus", "c", "--out", "o"])
    assert config == BuildConfig("c", "o") and config.shard_size == DEFAULT_SHARD_SIZE
    assert config.encode == EncodeConfig() and (config.encode.encoder, config.encode.resolution,
                                                config.encode.batch_size, config.encode.dtype) == ("pixels", 32, 256, "float32")
    assert config.to_json()["encode"]["max_member_bytes"] == 256 * 2**20


@pytest.mark.parametrize("kwargs, flag", [
    ({"resolution": 0}, "--resolution must be >= 1, got 0"),
    ({"batch_size": -3}, "--batch-size must be >= 1, got -3"),
    ({"num_encoders": -1}, "--num-encoders must be >= 0, got -1"),
    ({"max_member_bytes": 0}, "--max-member-bytes must be >= 1, got 0"),
    ({"shard_size": 0}, "--shard-size must be >= 1, got 0"),
    ({"dtype": "int8"}, "--dtype must be one of float32, float16, got 'int8'"),
])
def test_build_config_refuses_bad_values_naming_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as exc:
        BuildConfig.build("c", "o", **kwargs)
    assert exc.value.flag == flag


def test_build_config_refuses_unknown_or_doubled_options():
    with pytest.raises(TypeError, match="unknown build-index option"):
        BuildConfig.build("c", "o", resolutoin=8)
    with pytest.raises(TypeError, match="pass encode= or its fields"):
        BuildConfig.build("c", "o", encode=EncodeConfig(), resolution=8)


def test_audit_config_from_the_command_line_equals_the_keyword_api():
    config = parse(AuditConfig, ["RUN", "--index", "gs://b/idx", "--radius", "4.5", "--fail-above", "0.01", "--fail-on", "rate"])
    assert config == AuditConfig.build("RUN", index="gs://b/idx", radius=4.5, fail_above=0.01, fail_on="rate")
    assert config.gate == GateConfig(0.01, "rate") and config.gate.gated
    ungated = parse(AuditConfig, ["RUN"])
    assert ungated == AuditConfig("RUN") and ungated.top == 12 and not ungated.gate.gated


@pytest.mark.parametrize("kwargs, flag", [
    ({"radius": 0.0}, "--radius must be > 0, got 0.0"),
    ({"radius": float("inf")}, "--radius must be a finite number, got inf"),
    ({"top": -1}, "--top must be >= 0, got -1"),
    ({"fail_above": 1.5}, "--fail-above must be a rate in [0, 1], got 1.5"),
    ({"fail_on": "mean"}, "--fail-on must be one of upper, rate, got 'mean'"),
])
def test_audit_config_refuses_bad_values_naming_the_flag(kwargs, flag):
    with pytest.raises(ConfigError) as exc:
        AuditConfig.build("RUN", **kwargs)
    assert exc.value.flag == flag


def test_help_shows_each_default_once():
    parser = argparse.ArgumentParser()
    BuildConfig.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "(default 32)" in text and "(default 100000)" in text and "(default float32)" in text
    assert "(default 268435456, 256 MiB)" in text
