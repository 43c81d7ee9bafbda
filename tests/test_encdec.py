"""The T5 encoder-decoder: relative buckets, cached decoding, packing, scan/remat, axes, size, training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transformer import draw_params

from llm_jax.config import DEFAULT_AXIS_RULES, Config, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.models.decoder import count_params
from llm_jax.models.encdec import EncoderDecoder
from llm_jax.models.flops import flops_per_token, tokens_per_row
from llm_jax.models.relative import relative_position_bucket
from llm_jax.train.optim import make_optimizer
from llm_jax.train.steps import init_state, train_step

LOGICAL_NAMES = {name for name, _ in DEFAULT_AXIS_RULES}
VOCAB = 64


def tiny(**overrides) -> ModelConfig:
    values = dict(arch="t5", vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=2, d_ff=64)
    values.update(overrides)
    return ModelConfig(**values)


def tokens_of(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, size=shape), jnp.int32)


def abstract_variables(config: ModelConfig):
    """Boxed ShapeDtypeStructs of init, without compiling it."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: EncoderDecoder(config).init(jax.random.key(0), tokens, encoder_tokens=tokens))


def random_params(config: ModelConfig, seed: int = 0, std: float = 0.2):
    """Unboxed params drawn with numpy (compiling `init` costs seconds); norm scales around 1."""
    return draw_params(abstract_variables(config)["params"], seed, std)


@functools.cache
def forward(config: ModelConfig):
    """Jitted teacher-forced logits, one compile per config and shapes."""
    def run(params, tokens, positions, segment_ids, encoder_tokens, encoder_positions, encoder_segment_ids):
        return EncoderDecoder(config).apply(
            {"params": params}, tokens, positions, segment_ids, encoder_tokens=encoder_tokens,
            encoder_positions=encoder_positions, encoder_segment_ids=encoder_segment_ids)

    return jax.jit(run)


def restack(params):
    """Each stack's unrolled layers (layer_0, layer_1, ...) to the scanned layout ("layers")."""
    def stacked(stack):
        names = sorted((k for k in stack if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
        out = {k: v for k, v in stack.items() if not k.startswith("layer_")}
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[stack[k] for k in names])
        return out

    return {k: stacked(v) if k in ("encoder", "decoder") else v for k, v in params.items()}


def test_relative_position_buckets_by_hand():
    # Bidirectional, 32 buckets: 16 per direction, 8 exact; keys before the query (negative) in
    # [0, 16), after it in [16, 32). Log region: 8 + floor(8 * ln(d / 8) / ln(128 / 8)).
    relative = jnp.asarray([0, -3, 3, -7, -8, -12, 12, -20, -100, -127, -128, -1000, 1000])
    expected = [0, 3, 19, 7, 8, 9, 25, 10, 15, 15, 15, 15, 31]
    bidirectional = relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
    assert bidirectional.tolist() == expected
    # Causal: all 32 buckets look back, 16 exact; keys after the query share bucket 0.
    # Log region: 16 + floor(16 * ln(d / 16) / ln(128 / 16)).
    relative = jnp.asarray([0, -5, 5, -15, -16, -20, -64, -127, -128, -500])
    expected = [0, 5, 0, 15, 16, 17, 26, 31, 31, 31]
    causal = relative_position_bucket(relative, bidirectional=False, num_buckets=32, max_distance=128)
    assert causal.tolist() == expected


@functools.cache
def decode_steps(config: ModelConfig):
    """Jitted step-by-step cached decoding of teacher-forced targets: logits [B, L, V]. Encodes once,
    creates the cache with a full-length decode call, then feeds one target token per step."""
    model = EncoderDecoder(config)

    def run(params, targets, encoder_tokens, encoder_segment_ids):
        encoded = model.apply({"params": params}, encoder_tokens, None, encoder_segment_ids, method="encode")
        _, variables = model.apply({"params": params}, jnp.zeros_like(targets), encoded,
                                   encoder_segment_ids=encoder_segment_ids, decode=True, mutable=["cache"],
                                   method="decode")

        def step(cache, token_B):
            logits_B1V, mutated = model.apply({"params": params, "cache": cache}, token_B[:, None], encoded,
                                              encoder_segment_ids=encoder_segment_ids, decode=True,
                                              mutable=["cache"], method="decode")
            return mutated["cache"], logits_B1V[:, 0]

        _, logits_LBV = jax.lax.scan(step, variables["cache"], targets.T)
        return jnp.swapaxes(logits_LBV, 0, 1)

    return jax.jit(run)


def test_cached_decoding_equals_the_teacher_forced_forward_scanned_or_not():
    config, scanned = tiny(), tiny(scan_layers=True)
    params = random_params(config)
    assert jax.tree.map(jnp.shape, restack(params)) == jax.tree.map(jnp.shape, random_params(scanned))
    encoder_tokens, targets = tokens_of(0, (4, 6)), tokens_of(1, (4, 6))
    # Rows 2 and 3 end in encoder padding, which cross-attention must not see.
    encoder_segment_ids = jnp.asarray([[1] * 6, [1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3], jnp.int32)
    ones, positions = jnp.ones((4, 6), jnp.int32), jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (4, 6))
    args = (targets, positions, ones, encoder_tokens, positions, encoder_segment_ids)
    full = np.asarray(forward(config)(params, *args))
    assert full.shape == (4, 6, VOCAB) and full.dtype == np.float32
    np.testing.assert_allclose(np.asarray(forward(scanned)(restack(params), *args)), full, rtol=1e-5, atol=1e-5)
    for model_config, model_params in ((config, params), (scanned, restack(params))):
        stepped = decode_steps(model_config)(model_params, targets, encoder_tokens, encoder_segment_ids)
        np.testing.assert_allclose(np.asarray(stepped), full, rtol=1e-5, atol=1e-5)
    # The padding's tokens change nothing; other encoder tokens do.
    changed = np.asarray(forward(config)(params, targets, positions, ones,
                                         encoder_tokens.at[2:, 4:].set(5), positions, encoder_segment_ids))
    np.testing.assert_allclose(changed, full, rtol=1e-5, atol=1e-5)
    changed = np.asarray(forward(config)(params, targets, positions, ones,
                                         (encoder_tokens.at[:, 0].add(1)) % VOCAB, positions, encoder_segment_ids))
    assert np.abs(changed - full).max(axis=(1, 2)).min() > 1e-3


def test_packed_examples_do_not_see_each_other():
    config = tiny()
    params = random_params(config)
    a_in, b_in = tokens_of(2, (1, 3)), tokens_of(3, (1, 2))
    a_out, b_out = tokens_of(4, (1, 3)), tokens_of(5, (1, 2))
    pad1, pad3, pad4 = (jnp.zeros((1, n), jnp.int32) for n in (1, 3, 4))
    # Row 0: examples A and B packed, then padding; row 1: A alone; row 2: B alone; row 3: as row 0
    # with B's tokens changed on both sides.
    b_in2, b_out2 = (b_in + 7) % VOCAB, (b_out + 9) % VOCAB
    encoder_tokens = jnp.concatenate([jnp.concatenate(row, axis=1) for row in
                                      ([a_in, b_in, pad1], [a_in, pad3], [b_in, pad4], [a_in, b_in2, pad1])])
    targets = jnp.concatenate([jnp.concatenate(row, axis=1) for row in
                               ([a_out, b_out, pad1], [a_out, pad3], [b_out, pad4], [a_out, b_out2, pad1])])
    packed_ids, packed_pos = [1, 1, 1, 2, 2, 0], [0, 1, 2, 0, 1, 0]
    segment_ids = jnp.asarray([packed_ids, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], packed_ids], jnp.int32)
    positions = jnp.asarray([packed_pos, [0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3], packed_pos], jnp.int32)
    logits = np.asarray(forward(config)(params, targets, positions, segment_ids, encoder_tokens, positions,
                                        segment_ids))
    np.testing.assert_allclose(logits[0, :3], logits[1, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 3:5], logits[2, :2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[3, :3], logits[0, :3], rtol=1e-5, atol=1e-5)
    assert np.abs(logits[3, 3:5] - logits[0, 3:5]).max() > 1e-3  # B's own logits do change


def _loss(config):
    targets, encoder_tokens = tokens_of(8, (2, 6)), tokens_of(9, (2, 8))
    inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))

    def loss(params):
        logits = EncoderDecoder(config).apply({"params": params}, inputs, encoder_tokens=encoder_tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss


def test_remat_and_scan_keep_the_loss():
    # Equal losses alone cannot tell whether remat happened; the jaxpr of the gradient can. The
    # gradients themselves are compiled by the training test below (scanned, "dots").
    config = tiny(n_layers=1)
    params = random_params(config)
    expected = float(jax.jit(_loss(config))(params))
    for remat, scan, policy in (("full", False, "policy=None"), ("dots", True, "save_from_both_policies")):
        model_config = tiny(n_layers=1, scan_layers=scan, remat=remat)
        model_params = restack(params) if scan else params
        jaxpr = str(jax.make_jaxpr(jax.grad(_loss(model_config)))(model_params))
        assert "remat" in jaxpr and policy in jaxpr
        assert float(jax.jit(_loss(model_config))(model_params)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axis_names(scan):
    params = abstract_variables(tiny(scan_layers=scan))["params"]
    boxes = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(boxes) == len(jax.tree.leaves(params)) > 20
    for box in boxes:
        assert isinstance(box, nn.Partitioned), box
        assert len(box.names) == len(box.value.shape)
        assert set(box.names) <= LOGICAL_NAMES | {None}
    for stack in ("encoder", "decoder"):
        layer_boxes = jax.tree.leaves(params[stack]["layers" if scan else "layer_1"],
                                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all((box.names[0] == "layers") == scan for box in layer_boxes)
        assert params[stack]["relative_position"]["bias"].names == (None, "heads")


def test_t5_base_parameter_count():
    # t5-v1_1-base: 247,577,856 parameters in Hugging Face's T5ForConditionalGeneration.
    config = ModelConfig(arch="t5", vocab_size=32128, d_model=768, d_ff=2048, n_heads=12, n_layers=12)
    assert count_params(abstract_variables(config)["params"]) == 247_577_856


def test_separate_encoder_and_decoder_depths():
    params = abstract_variables(tiny(n_encoder_layers=3, n_decoder_layers=1))["params"]
    assert sorted(k for k in params["encoder"] if k.startswith("layer_")) == ["layer_0", "layer_1", "layer_2"]
    assert sorted(k for k in params["decoder"] if k.startswith("layer_")) == ["layer_0"]


def test_flops_count_each_weight_at_its_positions():
    # Grouped-query keys and unequal stacks, so that each kind of weight has its own size.
    model = tiny(n_encoder_layers=3, n_decoder_layers=2, n_kv_heads=1)
    config = Config(model=model, train=TrainConfig(seq_len=16, target_len=6))
    enc_len, dec_len = 16, 6
    assert tokens_per_row(config) == enc_len + dec_len
    # Every kernel of the network, at the positions it runs at: the encoder's and the cross-attention's
    # keys and values over the encoder's positions, the rest of the decoder and lm_head over the targets.
    weighted = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_variables(model)["params"])):
        names = [key.key for key in path]
        if names[-1] == "kernel":
            over_encoder = names[0] == "encoder" or ("cross_attn" in names and names[-2] in ("key", "value"))
            weighted += leaf.size * (enc_len if over_encoder else dec_len)
    attention = 12 * model.d_model * (3 * enc_len**2 + 2 * (dec_len**2 + dec_len * enc_len))
    assert flops_per_token(config) * tokens_per_row(config) == pytest.approx(6 * weighted + attention, rel=1e-12)


def test_original_t5_ties_and_scales_its_output():
    # The original T5: relu fc/proj MLP, the embedding as output projection fed x * d_model**-0.5.
    config = tiny(activation="relu", gated_mlp=False, tie_embeddings=True)
    params = random_params(config)
    assert "lm_head" not in params and set(params["encoder"]["layer_0"]["mlp"]) == {"fc", "proj"}

    @jax.jit
    def run(params, tokens, encoder_tokens):
        return EncoderDecoder(config).apply({"params": params}, tokens, encoder_tokens=encoder_tokens,
                                            capture_intermediates=lambda module, _: module.name == "decoder",
                                            mutable=["intermediates"])

    logits, state = run(params, tokens_of(10, (2, 6)), tokens_of(11, (2, 8)))
    (hidden_BLE,) = state["intermediates"]["decoder"]["__call__"]
    expected = np.einsum("ble,ve->blv", np.asarray(hidden_BLE) * config.d_model**-0.5,
                         np.asarray(params["embed"]["embedding"]))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-5)
    # Unscaled, the logits would be sqrt(d_model) times larger: the comparison tells them apart.
    assert np.abs(expected).max() > 1e-2


def test_train_steps_learn_to_read_the_encoder():
    config = tiny(scan_layers=True, remat="dots")
    model = EncoderDecoder(config)
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), total_steps=100)
    state = jax.jit(lambda r: nn.unbox(init_state(r, model, tx, seq_len=8)))(jax.random.key_data(jax.random.key(0)))
    first = state.params
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule))
    rng = np.random.default_rng(0)
    ones = np.ones((8, 8), np.int32)
    positions = np.broadcast_to(np.arange(8, dtype=np.int32), (8, 8)).copy()
    losses = []
    for _ in range(30):
        # Copy a row's one token (of 16) from the encoder side. The decoder's inputs reveal it from
        # position 1 on, but not at position 0: a decoder that ignored the encoder would stay at
        # ln(16) / 8 = 0.35 per token on average at best.
        source = np.repeat(rng.integers(4, 20, size=(8, 1)), 8, axis=1).astype(np.int32)
        batch = {"encoder_inputs": source, "encoder_segment_ids": ones, "encoder_positions": positions,
                 "inputs": np.pad(source[:, :-1], ((0, 0), (1, 0))), "targets": source, "segment_ids": ones,
                 "positions": positions, "weights": ones.astype(np.float32)}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[0] > 3.0
    assert np.mean(losses[-5:]) < 0.2, losses
    # Both stacks' relative position tables learn.
    for stack in ("encoder", "decoder"):
        assert np.abs(np.asarray(state.params[stack]["relative_position"]["bias"])
                      - np.asarray(first[stack]["relative_position"]["bias"])).max() > 1e-4
