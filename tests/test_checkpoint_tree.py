"""The checkpoint's tree against the config's: differences named in one phrase; scanned and unrolled
layers restore into each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.train import checkpoint_tree as ct


def _unrolled_state(n_layers=2, width=3):
    layers = {f"layer_{i}": {"mlp": {"kernel": jnp.full((width, 4), float(i)), "bias": jnp.arange(4.0) + i}}
              for i in range(n_layers)}
    params = {"embed": {"embedding": jnp.ones((5, width))}, **layers}
    moments = jax.tree.map(lambda x: x * 10, params)
    return {"step": jnp.array(7), "params": params, "opt_state": ({"count": jnp.array(7), "mu": moments},)}


def _stacked(tree):
    """The same state as scan_layers lays it out: the layer_i subtrees stacked under `layers`."""
    def stack(node):
        if not isinstance(node, dict):
            return node
        layer_keys = sorted(k for k in node if k.startswith("layer_"))
        out = {k: stack(v) for k, v in node.items() if k not in layer_keys}
        if layer_keys:
            out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[node[k] for k in layer_keys])
        return out
    return {"step": tree["step"], "params": stack(tree["params"]),
            "opt_state": tuple(stack(s) for s in tree["opt_state"])}


def _specs(tree):
    return ct.specs(ct.flat(tree))


def test_paths_are_plain_names_whatever_the_containers():
    assert ("opt_state", "0", "mu", "layer_1", "mlp", "bias") in ct.flat(_unrolled_state())


def test_scanned_and_unrolled_trees_fit_each_other():
    unrolled = _unrolled_state()
    assert ct.difference(_specs(unrolled), _specs(_stacked(unrolled))) is None
    assert ct.difference(_specs(_stacked(unrolled)), _specs(unrolled)) is None


@pytest.mark.parametrize("changed, expected", [
    (_unrolled_state(width=6), "params/embed/embedding is float32[5,3] in the checkpoint, float32[5,6] in this config"),
    (_unrolled_state(n_layers=3), "this config has params/layer_2 (2 arrays) that the checkpoint does not"),
    (_stacked(_unrolled_state(n_layers=3)), "params/layers/mlp/bias is float32[2,4] in the checkpoint, "
                                            "float32[3,4] in this config"),
])
def test_a_difference_is_named_in_one_phrase(changed, expected):
    assert ct.difference(_specs(_unrolled_state()), _specs(changed)) == expected


def test_a_missing_optimizer_subtree_is_named():
    saved = _unrolled_state()
    other = {**saved, "opt_state": (*saved["opt_state"], {"count": jnp.array(0)})}
    assert ct.difference(_specs(saved), _specs(other)) == \
        "this config has opt_state/1 (1 array) that the checkpoint does not"
    assert ct.difference(_specs(other), _specs(saved)) == \
        "the checkpoint has opt_state/1 (1 array) that this config does not"


def test_a_dtype_change_is_a_difference():
    saved = _unrolled_state()
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, saved)
    assert "float32[5,3] in the checkpoint, bfloat16[5,3] in this config" in ct.difference(_specs(saved), _specs(bf16))


@pytest.mark.parametrize("saved_layout, config_layout", [("unrolled", "stacked"), ("stacked", "unrolled")])
def test_layers_convert_between_layouts_with_the_same_values(saved_layout, config_layout):
    unrolled = _unrolled_state()
    trees = {"unrolled": unrolled, "stacked": _stacked(unrolled)}
    saved, wanted = trees[saved_layout], trees[config_layout]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), wanted)

    target = ct.restore_target(saved, abstract)  # what orbax would be asked to read: the saved layout
    assert jax.tree.structure(target) == jax.tree.structure(saved)
    assert [t.shape for t in jax.tree.leaves(target)] == [x.shape for x in jax.tree.leaves(saved)]
    converted = ct.to_expected_layout(saved, abstract)
    assert jax.tree.structure(converted) == jax.tree.structure(wanted)
    for got, want in zip(jax.tree.leaves(converted), jax.tree.leaves(wanted)):
        np.testing.assert_array_equal(got, want)
