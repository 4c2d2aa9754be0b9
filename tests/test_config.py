"""The config system: typed fields, YAML plus overrides, errors that name the field, secrets redacted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from openllama.config import ConfigError, build, flatten, load, looks_secret, redact
from openllama.train.model import LlamaConfig, ModelRuntime


@dataclass(frozen=True)
class Optim:
    lr: float = 3e-4
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass(frozen=True)
class Job:
    name: str
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: demo\nsteps: 5\noptim:\n  lr: 1e-3\n")
    job = load(Job, path, ["optim.schedule=linear", "tags=[a, b]", "steps=7"])
    assert job == Job(name="demo", steps=7, optim=Optim(lr=1e-3, schedule="linear"), tags=["a", "b"])


def test_int_is_accepted_where_float_is_expected():
    assert build(Job, {"name": "x", "optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize(
    ("values", "overrides", "message"),
    [
        ({"name": "x"}, ["steps=many"], "steps='many' must be of type int"),
        ({"name": "x"}, ["optim.schedule=step"], "optim.schedule='step' is not allowed; allowed: ['cosine', 'linear']"),
        ({"name": "x"}, ["optim.momentum=0.9"], "unknown field optim.momentum"),
        ({"name": "x"}, ["stepz=3"], "unknown field stepz"),
        ({}, [], "missing required field name"),
        ({"name": "x"}, ["steps=true"], "steps=True must be of type int, not a bool"),
        ({"name": "x"}, ["optim=3"], "optim must be a mapping"),
        ({"name": "x"}, ["tags=notalist"], "tags='notalist' must be a list"),
        ({"name": "x"}, ["limit=1.5"], "limit=1.5 must be of type int"),
        ({"name": "x"}, ["steps"], "must look like key=value"),
    ],
)
def test_bad_values_name_the_field(tmp_path, values, overrides, message):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as error:
        load(Job, path, overrides)
    assert message in str(error.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load(Job, tmp_path / "does-not-exist.yaml")


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown model preset '70b'"):
        LlamaConfig.preset("70b")
    with pytest.raises(ValueError, match="model.num_attention_heads=4 is not divisible by model.num_key_value_heads=3"):
        LlamaConfig.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="model.dtype='fp8'"):
        ModelRuntime(dtype="fp8")


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("mlflow.api_key", True),
        ("hf_token", True),
        ("db.password", True),
        ("secret_value", True),
        ("model.num_key_value_heads", False),
        ("model.bos_token_id", False),
        ("eval.max_new_tokens", False),
    ],
)
def test_secret_looking_names(name, secret):
    assert looks_secret(name) is secret


def test_redact_hides_secret_values_only():
    flat = flatten({"mlflow": {"token": "abc", "uri": "http://127.0.0.1:5000"}, "model": {"num_key_value_heads": 4}})
    assert redact(flat) == {
        "mlflow.token": "***",
        "mlflow.uri": "http://127.0.0.1:5000",
        "model.num_key_value_heads": 4,
    }
