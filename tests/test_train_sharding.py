"""One rules table lays out every parameter; optimizer state follows its parameter."""

from __future__ import annotations

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

from openllama.train.model import LlamaConfig, ModelRuntime, init_params
from openllama.train.sharding import make_mesh, param_specs, spec_for, state_shardings


def test_rules_follow_the_easylm_layout():
    assert spec_for("embed_tokens/embedding") == P("tp", "fsdp")  # EasyLM: wte (mp, fsdp)
    assert spec_for("layers_3/self_attn/k_proj/kernel") == P("fsdp", "tp")
    assert spec_for("layers_3/self_attn/o_proj/kernel") == P("tp", "fsdp")
    assert spec_for("layers_3/mlp/up_proj/kernel") == P("fsdp", "tp")
    assert spec_for("layers_3/mlp/down_proj/kernel") == P("tp", "fsdp")
    assert spec_for("layers_3/post_attention_layernorm/weight") == P()
    assert spec_for("norm/weight") == P()
    assert spec_for("lm_head/kernel") == P("fsdp", "tp")


def test_stacked_blocks_keep_their_layer_axis_whole_and_their_own_layout_behind_it():
    assert spec_for("layers/self_attn/k_proj/kernel") == P(None, "fsdp", "tp")
    assert spec_for("layers/mlp/down_proj/kernel") == P(None, "tp", "fsdp")
    assert spec_for("layers/input_layernorm/weight") == P(None)
    params = jax.eval_shape(lambda: init_params(LlamaConfig.preset("tiny"), 0, ModelRuntime(scan_layers=True)))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    mu = state_shardings(opt_state, params, make_mesh((1, 1, 1)))[0].mu
    assert mu["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tp")


@pytest.mark.parametrize("tied", [False, True])
def test_every_parameter_of_the_model_matches_a_rule(tied):
    params = jax.eval_shape(lambda: init_params(LlamaConfig.preset("tiny", tie_word_embeddings=tied), 0))
    specs = jax.tree.leaves(param_specs(params), is_leaf=lambda x: isinstance(x, P))
    assert len(specs) == len(jax.tree.leaves(params))


def test_unknown_parameter_is_an_error_naming_it():
    with pytest.raises(ValueError, match="layers_0/mystery/kernel matches no rule"):
        spec_for("layers_0/mystery/kernel")


def test_adam_moments_are_sharded_like_their_parameter():
    params = jax.eval_shape(lambda: init_params(LlamaConfig.preset("tiny"), 0))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    shardings = state_shardings(opt_state, params, make_mesh((1, 1, 1)))
    mu = shardings[0].mu
    assert mu["layers_1"]["mlp"]["down_proj"]["kernel"].spec == P("tp", "fsdp")
    assert shardings[0].count.spec == P()


@pytest.mark.parametrize("preset", ["openllama-3b", "openllama-7b", "openllama-13b"])
def test_every_parameter_of_a_preset_lays_out_on_its_slice(preset):
    import jax

    from openllama.train.config import load_config, mesh_shape
    from openllama.train.model import init_params
    from openllama.train.sharding import check_divisible
    from openllama.train.tpu import slice_of

    config = load_config(preset)
    chips = slice_of(config.scaling.accelerator_type, config.scaling.topology).chips
    dp, fsdp, tp = mesh_shape(config, chips)
    shapes = jax.eval_shape(lambda: init_params(config.llama(), 0, config.runtime()))  # stacked: the presets scan
    check_divisible(shapes, {"dp": dp, "fsdp": fsdp, "tp": tp})


def test_a_tensor_that_does_not_divide_its_mesh_axis_is_named():
    import jax

    from openllama.config import ConfigError
    from openllama.train.model import LlamaConfig, init_params
    from openllama.train.sharding import check_divisible

    shapes = jax.eval_shape(lambda: init_params(LlamaConfig.preset("tiny")))
    with pytest.raises(ConfigError, match=r"embed_tokens/embedding \(512, 64\) .* axis of 64 does not divide 128"):
        check_divisible(shapes, {"dp": 1, "fsdp": 128, "tp": 1})
