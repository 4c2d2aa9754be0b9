"""`openllama config show`: the resolved config a command would run with."""

from __future__ import annotations

import yaml

from openllama.cli import main as cli


def test_show_prints_a_training_config_with_overrides_applied_and_the_model_spelled_out(capsys):
    assert cli(["config", "show", "tiny-cpu", "train.steps=50"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 50
    assert shown["resolved_model"]["hidden_size"] == 64
    assert shown["resolved_runtime"]["dtype"] == "float32" and "dtype" not in shown["resolved_model"]


def test_show_prints_a_model_preset(capsys):
    assert cli(["config", "show", "7b"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["hidden_size"] == 4096


def test_an_unknown_preset_is_an_error_that_lists_the_known_ones(capsys):
    assert cli(["config", "show", "tiny-gpu"]) == 2
    error = capsys.readouterr().err
    assert "unknown preset 'tiny-gpu'" in error and "tiny-cpu" in error and "7b" in error


def test_a_misspelled_override_names_the_field(capsys):
    assert cli(["config", "show", "tiny-cpu", "train.stepz=5"]) == 2
    assert "unknown field train.stepz" in capsys.readouterr().err


def test_show_prints_a_commands_settings_with_required_ones_marked(capsys):
    assert cli(["config", "show", "eval", "batch_size=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["batch_size"] == 4 and shown["checkpoint"] == "<required>"


def test_every_command_with_settings_can_be_shown(capsys):
    from openllama.show import configured_verbs

    assert {"data dedup", "data convert", "data tokenize", "tokenizer train"} <= set(configured_verbs())
    for name in configured_verbs():
        assert cli(["config", "show", *name.split()]) == 0, capsys.readouterr().err


def test_a_two_word_command_is_shown_with_its_overrides(capsys):
    assert cli(["config", "show", "tokenizer", "train", "vocab_size=600"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["vocab_size"] == 600 and shown["out"] == "<required>"


def test_a_misspelled_command_setting_names_the_field(capsys):
    assert cli(["config", "show", "generate", "max_new_tokenz=5"]) == 2
    assert "unknown field max_new_tokenz" in capsys.readouterr().err
