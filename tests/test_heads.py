"""Task heads: the body's parameter tree is the pretraining model's, pooling reads the real tokens only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.config import ModelConfig
from llm_jax.models.build import make_model
from llm_jax.models.heads import TaskModel, pool


def _cfg(arch: str) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_len=16)


@pytest.mark.parametrize("arch,kind,pooling", [("bert", "classify", "cls"), ("gpt2", "classify", "last"),
                                               ("llama", "tag", "last")])
def test_the_body_has_the_pretraining_tree_and_the_head_is_new(arch, kind, pooling):
    tokens = jnp.ones((2, 8), jnp.int32)
    key = jax.random.key(0)
    params = jax.eval_shape(TaskModel(_cfg(arch), kind, 3, pooling).init, key, tokens)["params"]
    pretraining = jax.eval_shape(make_model(_cfg(arch)).init, key, tokens)["params"]
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(params["body"]))
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(pretraining))
    assert set(params) == {"body", "head"}
    specs = nn.get_partition_spec(params["head"])
    assert tuple(specs["kernel"]) == ("embed", None) and tuple(specs["bias"]) == (None,)


def test_pooling_reads_the_last_real_token_or_the_mean_of_the_real_tokens():
    hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    segments = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(pool(hidden, segments, "last"), jnp.stack([hidden[0, 1], hidden[1, 3]]))
    np.testing.assert_allclose(pool(hidden, segments, "mean"),
                               jnp.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


def test_padding_after_the_example_does_not_change_a_decoders_classification():
    model = TaskModel(_cfg("gpt2"), "classify", 3, "last")
    short = jnp.array([[5, 6, 7]])
    padded = jnp.array([[5, 6, 7, 9, 9]])
    variables = model.init(jax.random.key(1), padded)
    want = model.apply(variables, short)
    got = model.apply(variables, padded, segment_ids=jnp.array([[1, 1, 1, 0, 0]]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
