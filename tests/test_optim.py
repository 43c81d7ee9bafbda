import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llm_jax.config import ModelConfig, OptimizerConfig
from llm_jax.models.decoder import Transformer
from llm_jax.train.optim import decay_mask, describe_dtypes, make_optimizer, make_schedule


def _abstract_params(**model):
    config = ModelConfig(**{**dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=16), **model})
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(lambda t: Transformer(config).init(jax.random.key(0), t), tokens)
    return nn.unbox(variables["params"])


def _decayed(params) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    return sorted("/".join(str(k.key) for k in path) for path, decays in flat if decays)


def test_schedule_warms_up_then_decays_to_the_floor():
    config = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    schedule = make_schedule(config, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.1)


def test_decay_mask_spares_norms_and_biases():
    params = {"block": {"attn": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                        "norm": {"scale": jnp.ones((3, 2))}}, "embed": {"embedding": jnp.ones((4, 2))}}
    mask = decay_mask(params)
    assert mask["block"]["attn"]["kernel"] and mask["embed"]["embedding"]
    assert not mask["block"]["attn"]["bias"] and not mask["block"]["norm"]["scale"]


@pytest.mark.parametrize("arch, expected", [
    # gpt2: tied token embedding, learned positions (not decayed), biases and LayerNorm (not decayed).
    ("gpt2", ["embed/embedding"] + [f"layer_{i}/{m}/kernel" for i in range(2)
                                    for m in ("attn/key", "attn/out", "attn/query", "attn/value",
                                              "mlp/fc", "mlp/proj")]),
    # llama: untied output projection, RoPE (no table), RMSNorm scales (not decayed), no biases.
    ("llama", ["embed/embedding"] + [f"layer_{i}/{m}/kernel" for i in range(2)
                                     for m in ("attn/key", "attn/out", "attn/query", "attn/value",
                                               "mlp/gate", "mlp/proj", "mlp/up")] + ["lm_head/kernel"]),
])
def test_weight_decay_reaches_exactly_the_kernels_and_token_embeddings(arch, expected):
    assert _decayed(_abstract_params(arch=arch)) == sorted(expected)


def test_scanned_stack_decays_the_same_weights():
    scanned = _decayed(_abstract_params(arch="gpt2", scan_layers=True))
    assert "pos_embed/embedding" not in scanned and "layers/attn_norm/scale" not in scanned
    assert "layers/mlp/fc/kernel" in scanned and "layers/mlp/fc/bias" not in scanned


def test_lamb_trust_ratio_is_per_layer_when_layers_are_scanned():
    """The same parameters laid out unscanned (layer_i/...) and scanned (layers/... with a leading
    [n_layers] axis) get the same LAMB update, layer by layer."""
    n_layers = 3
    model = dict(n_layers=n_layers)
    config = OptimizerConfig(name="lamb", lr=0.1, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.01, clip_norm=0.0)
    abstract = _abstract_params(**model)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(1), 2 * len(leaves))

    def draw(key, leaf, path):
        """Each layer at its own scale, so one ratio over the whole stack cannot match per-layer ones."""
        layer = next((int(k.key.split("_")[1]) for k in path if str(k.key).startswith("layer_")), 0)
        return (layer + 1) ** 2 * jax.random.normal(key, leaf.shape, jnp.float32)

    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    params = treedef.unflatten([draw(keys[i], leaf, p) for i, (leaf, p) in enumerate(zip(leaves, paths))])
    grads = treedef.unflatten([jax.random.normal(keys[len(leaves) + i], leaf.shape) for i, leaf in enumerate(leaves)])

    def scan(tree):
        layers = [tree[f"layer_{i}"] for i in range(n_layers)]
        rest = {k: v for k, v in tree.items() if not k.startswith("layer_")}
        return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}

    scanned_params, scanned_grads = scan(params), scan(grads)
    assert jax.tree.structure(scanned_params) == jax.tree.structure(_abstract_params(scan_layers=True, **model))

    tx, _ = make_optimizer(config, total_steps=10)
    tx_scanned, _ = make_optimizer(config, total_steps=10, scan_layers=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    updates_scanned, _ = tx_scanned.update(scanned_grads, tx_scanned.init(scanned_params), scanned_params)
    for i in range(n_layers):
        per_layer = jax.tree.map(lambda x: x[i], updates_scanned["layers"])  # noqa: B023 - used at once
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), per_layer, updates[f"layer_{i}"])
    for name in ("embed", "pos_embed", "final_norm"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                     updates_scanned[name], updates[name])


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_bfloat16_params_keep_float32_moments(name):
    tx, _ = make_optimizer(OptimizerConfig(name=name, warmup_steps=0), total_steps=10)
    params = {"w": jnp.ones((4, 4), jnp.bfloat16), "bias": jnp.ones(4, jnp.bfloat16)}
    state = tx.init(params)
    moments = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(moments) == 4 and all(x.dtype == jnp.float32 for x in moments)  # mu and nu of each leaf
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    updates, state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new_params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert describe_dtypes(new_params, state, "bfloat16") == \
        "params bfloat16, optimizer moments float32, compute bfloat16"


def test_lamb_trust_ratio_matches_a_hand_computation():
    lr, wd, eps = 0.1, 0.01, 1e-6
    config = OptimizerConfig(name="lamb", lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=wd, eps=eps,
                             b1=0.9, b2=0.999, clip_norm=0.0)
    tx, _ = make_optimizer(config, total_steps=10)
    w = np.array([[1.0, -2.0], [3.0, 0.5]], np.float32)
    b = np.array([0.5, -0.25], np.float32)
    gw = np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32)
    gb = np.array([0.05, -0.5], np.float32)
    params = {"dense": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    grads = {"dense": {"kernel": jnp.asarray(gw), "bias": jnp.asarray(gb)}}
    updates, _ = tx.update(grads, tx.init(params), params)

    def lamb_update(p, g, decay):
        # Step 1 of Adam with bias correction: m_hat = g, v_hat = g^2.
        adam = g / (np.sqrt(g * g) + eps)
        u = adam + (wd * p if decay else 0.0)
        trust = np.linalg.norm(p) / np.linalg.norm(u)
        return -lr * trust * u

    np.testing.assert_allclose(updates["dense"]["kernel"], lamb_update(w, gw, True), rtol=1e-5)
    np.testing.assert_allclose(updates["dense"]["bias"], lamb_update(b, gb, False), rtol=1e-5)
    # The ratio is per layer: the kernel's update norm is lr * ||w||, not lr * ||u||.
    assert np.linalg.norm(updates["dense"]["kernel"]) == pytest.approx(lr * np.linalg.norm(w), rel=1e-5)


def test_adamw_clips_by_global_norm():
    """A huge first gradient, clipped to norm 1, weighs in Adam's moments like any gradient of norm 1.

    Adam's first update is g/|g| whatever the scale, so the first update cannot show clipping; the
    second does: unclipped, the huge first gradient dominates both moments and the second update
    (after a small gradient) shrinks to about 0.7 of the clipped one.
    """
    config = OptimizerConfig(lr=1.0, warmup_steps=0, min_lr_ratio=1.0, clip_norm=1.0, weight_decay=0.0)
    tx, _ = make_optimizer(config, total_steps=10)
    params = {"w": jnp.zeros(4)}
    huge = {"w": jnp.full(4, 1e6)}
    small = {"w": jnp.full(4, 0.5)}  # global norm 1.0: exactly at the threshold, unchanged by clipping

    def second_update(first):
        _, state = tx.update(first, tx.init(params), params)
        return tx.update(small, state, params)[0]["w"]

    # Clipped, the huge gradient equals the small one: two equal gradients, update -lr * sign.
    np.testing.assert_allclose(second_update(huge), second_update(small), rtol=1e-5)
    np.testing.assert_allclose(second_update(small), -1.0, rtol=1e-5)


def test_clipping_on_or_off_gives_the_same_state_tree():
    """A run resumes with clip_norm changed between 0 and a positive value: the state tree is the same."""
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    trees = [jax.tree.structure(make_optimizer(OptimizerConfig(clip_norm=clip), 10)[0].init(params))
             for clip in (0.0, 1.0)]
    assert trees[0] == trees[1]


def test_an_encoder_decoders_scanned_stacks_are_per_layer_for_lamb():
    """t5 scans each stack under its own name (encoder/layers, decoder/layers): LAMB must see their
    leading axis as the layer, and nothing else as stacked."""
    from llm_jax.models.build import init_inputs, make_model
    from llm_jax.train.optim import stacked_layers_mask

    config = ModelConfig(arch="t5", vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, scan_layers=True)
    tokens, extra = init_inputs(config, 8)
    params = nn.unbox(jax.eval_shape(lambda: make_model(config).init(jax.random.key(0), tokens, **extra))["params"])
    flat = jax.tree_util.tree_flatten_with_path(stacked_layers_mask(params, scan_layers=True))[0]
    stacked = {"/".join(str(k.key) for k in path): is_stacked for path, is_stacked in flat}
    assert stacked["encoder/layers/mlp/gate/kernel"] and stacked["decoder/layers/cross_attn/query/kernel"]
    assert not stacked["embed/embedding"] and not stacked["encoder/final_norm/scale"]
    assert all(is_stacked == ("/layers/" in name) for name, is_stacked in stacked.items())


# ----------------------------------------------------------------------------- fine-tuning: what is trained


def _moment_names(opt_state) -> set[str]:
    """The parameters (path names) that hold an Adam moment in `opt_state`."""
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if "mu" in [getattr(k, "name", None) for k in path]:
            names.add("/".join(keys[keys.index("train") + 1:] if "train" in keys else keys))
    return names


def test_frozen_parameters_are_bit_identical_after_training_and_hold_no_state():
    import functools

    from test_steps import MODEL, _batch

    from llm_jax.config import FinetuneConfig
    from llm_jax.train.steps import init_state, train_step

    model = Transformer(MODEL)
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), 100,
                                  finetune=FinetuneConfig(freeze="layers:1"))
    state = jax.jit(lambda r: nn.unbox(init_state(r, model, tx, seq_len=8)))(jax.random.key_data(jax.random.key(0)))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule))
    trained = state
    for seed in range(3):
        trained, _ = step(trained, _batch(seed=seed))
    before = {"/".join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    after = {"/".join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(trained.params)[0]}
    names = {name for name in before if name.startswith(("embed/", "pos_embed/", "layer_0/"))}
    assert names and all(np.array_equal(before[n], after[n]) for n in names)  # bit for bit
    assert all(not np.array_equal(before[n], after[n]) for n in set(before) - names)
    assert _moment_names(trained.opt_state) == set(before) - names  # moments only for what is trained


@pytest.mark.parametrize("freeze, trained", [("body", {"head/kernel"}),
                                             ("embeddings", {"head/kernel", "body/layer_0/w"})])
def test_freezing_the_body_or_the_embeddings(freeze, trained):
    from llm_jax.config import FinetuneConfig

    params = {"body": {"embed": {"embedding": jnp.ones((4, 2))}, "layer_0": {"w": jnp.ones((2, 2))}},
              "head": {"kernel": jnp.ones((2, 3))}}
    tx, _ = make_optimizer(OptimizerConfig(lr=0.1, warmup_steps=0), 10, finetune=FinetuneConfig(freeze=freeze))
    opt_state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    assert _moment_names(opt_state) == trained
    moved = {"/".join(str(k.key) for k in path) for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]
             if float(jnp.abs(u).max()) > 0}
    assert moved == trained


def _first_update(params, finetune):
    """The first AdamW update (no decay, no clipping): -lr * factor * sign(gradient), per element."""
    tx, _ = make_optimizer(OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.0, clip_norm=0.0), 10,
                           finetune=finetune)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    return tx.update(grads, tx.init(params), params)[0]


def test_layer_decay_and_head_lr_scale_each_layer_the_same_scanned_or_unrolled():
    from llm_jax.config import FinetuneConfig

    finetune = FinetuneConfig(layer_decay=0.5, head_lr=0.4)
    rng = np.random.default_rng(0)
    blocks = [{"attn": {"kernel": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}} for _ in range(3)]
    common = {"embed": {"embedding": jnp.ones((5, 2))}, "final_norm": {"scale": jnp.ones(2)},
              "head": {"kernel": jnp.ones((2, 4))}}
    unrolled = {**common, **{f"layer_{i}": b for i, b in enumerate(blocks)}}
    scanned = {**common, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    up_unrolled, up_scanned = _first_update(unrolled, finetune), _first_update(scanned, finetune)
    lr = -float(up_unrolled["final_norm"]["scale"][0])  # the plain rate: above the blocks, factor 1
    # lr * 0.5**(n - i) for block i of n = 3, 0.5**(n + 1) for the embeddings, head_lr / lr for the head.
    np.testing.assert_allclose([-float(up_unrolled[f"layer_{i}"]["attn"]["kernel"][0, 0]) for i in range(3)],
                               [lr / 8, lr / 4, lr / 2], rtol=1e-5)
    np.testing.assert_allclose(-up_unrolled["embed"]["embedding"], lr / 16, rtol=1e-5)
    np.testing.assert_allclose(-up_unrolled["head"]["kernel"], lr * 4, rtol=1e-5)
    for i in range(3):
        np.testing.assert_array_equal(up_scanned["layers"]["attn"]["kernel"][i],
                                      up_unrolled[f"layer_{i}"]["attn"]["kernel"])
    for name in common:  # the embeddings sit below the stack however it is laid out
        np.testing.assert_array_equal(jax.tree.leaves(up_scanned[name]), jax.tree.leaves(up_unrolled[name]))


def test_a_frozen_optimizer_state_checkpoints_and_restores_exactly(tmp_path):
    from llm_jax.config import load_config
    from llm_jax.train import checkpoint as ckpt
    from llm_jax.train import loop

    config = load_config("configs/tiny.yaml", [f"workdir={tmp_path}", "model.vocab_size=300", "train.seq_len=16",
                                              "finetune.freeze=layers:1", "finetune.layer_decay=0.8"])
    setup = loop.build(config, with_data=False)
    state = loop.create_state(setup)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # moments not all zero
    saver = ckpt.Checkpointer(tmp_path / "checkpoints", config.checkpoint)
    saver.save(3, state, None, {"step": 3})
    saver.close()
    reader = ckpt.Checkpointer(tmp_path / "checkpoints", config.checkpoint, read_only=True)
    restored, _ = reader.restore(3, setup.abstract_state)
    reader.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True))
