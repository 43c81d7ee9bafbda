"""The family registry: every family builds, and the network it builds is the one its entry describes."""

import flax.linen as nn
import jax
import pytest

from llm_jax.config import CHOICES, Config, ModelConfig
from llm_jax.models.build import init_inputs, make_model
from llm_jax.models.families import FAMILIES
from llm_jax.models.flops import matmul_param_count


def test_every_family_is_a_choice_of_model_arch():
    assert set(CHOICES["model.arch"]) == set(FAMILIES)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_defaults_come_from_the_family(arch):
    family = FAMILIES[arch]
    config = ModelConfig(arch=arch)
    assert config.resolved_position == family.position
    assert config.resolved_tie_embeddings == family.tie_embeddings
    assert ModelConfig(arch=arch, position="sinusoidal").resolved_position == "sinusoidal"
    assert ModelConfig(arch=arch, tie_embeddings=not family.tie_embeddings).resolved_tie_embeddings \
        == (not family.tie_embeddings)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_the_built_network_follows_the_family(arch):
    family = FAMILIES[arch]
    model_config = ModelConfig(arch=arch, vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=24, max_len=8)
    tokens, extra = init_inputs(model_config, 8)
    variables = jax.eval_shape(lambda: make_model(model_config).init(jax.random.key(0), tokens, **extra))
    params = nn.unbox(variables["params"])
    # An encoder-decoder's blocks live in its two stacks; the decoder's have a self- and a cross-attention.
    if family.encoder_decoder:
        blocks = [(params["encoder"]["layer_0"], ["attn"]),
                  (params["decoder"]["layer_0"], ["self_attn", "cross_attn"])]
    else:
        blocks = [(params["layer_0"], ["attn"])]
    for block, attentions in blocks:
        mlp_kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(block["mlp"])
                       if path[-1].key == "kernel"]
        assert len(mlp_kernels) == model_config.mlp_matrices
        for attn in attentions:
            has_bias = any(path[-1].key == "bias" for path, _ in jax.tree_util.tree_leaves_with_path(block[attn]))
            assert has_bias == family.bias
            assert ("bias" in block[f"{attn}_norm"]) == (family.norm == "layer")
    # An encoder ends in the masked-LM head and a pooler, a decoder (and each stack of an
    # encoder-decoder) in a final norm.
    assert {"mlm_head" in params, "pooler" in params} == {family.encoder}
    stacks = [params["encoder"], params["decoder"]] if family.encoder_decoder else [params]
    assert all(("final_norm" in stack) == (not family.encoder) for stack in stacks)
    # The FLOPs count sees the same matrices the network has (all but the input embedding lookup, and
    # the pooler, which pretraining does not run).
    config = Config(model=model_config)
    matmul_weights = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                         if (path[-1].key == "kernel" and path[0].key != "pooler")
                         or (family.tie_embeddings and path[0].key == "embed"))
    assert matmul_param_count(config) == matmul_weights


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_model_head_dim_sets_the_width_of_every_head(arch):
    # 3 heads of 8 against d_model 16: the shape of Hugging Face checkpoints such as t5-v1_1-small (6 x 64 < 512).
    model_config = ModelConfig(arch=arch, vocab_size=64, n_layers=1, d_model=16, n_heads=3, head_dim=8, n_kv_heads=1,
                               d_ff=24, max_len=8)
    tokens, extra = init_inputs(model_config, 8)
    model = make_model(model_config)
    variables = model.init(jax.random.key(0), tokens, **extra)
    params = nn.unbox(variables["params"])
    shapes = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    queries = [shape for name, shape in shapes.items() if "query" in name and name.endswith("['kernel']")]
    outputs = [shape for name, shape in shapes.items() if "'out'" in name and name.endswith("['kernel']")]
    assert queries and all(shape == (16, 3, 8) for shape in queries)
    assert outputs and all(shape == (3, 8, 16) for shape in outputs)
    out = model.apply(variables, tokens, **extra)
    assert all(bool(jax.numpy.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(out))
    matmul_weights = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                         if (path[-1].key == "kernel" and path[0].key != "pooler")
                         or (model_config.resolved_tie_embeddings and path[0].key == "embed"))
    assert matmul_param_count(Config(model=model_config)) == matmul_weights
