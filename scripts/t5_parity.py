"""Weight-for-weight parity of llm_jax's T5 (models/encdec.py) with Hugging Face's T5ForConditionalGeneration.

Builds a tiny `EncoderDecoder` (unequal encoder and decoder depths, so that a stack mix-up shows),
draws its parameters (T5's init, then every value scaled by its own random factor in [0.5, 1.5], so
that norm scales are not all 1 and a mis-mapped one shows), maps them to a Hugging Face state dict
with `llm-jax hf export`'s mapping (llm_jax/hf/t5.py), loads them into `T5ForConditionalGeneration`
(strict: every HF weight must come from one of ours, and the parameter counts must agree), runs both
on the same tokens in float32 and compares the logits:

- `full`: one forward pass of each, on two rows: one full, one with encoder padding (encoder
  segment ids 0 <-> HF attention_mask 0) and decoder padding (compared at the real positions only);
- `decode`: llm_jax's incremental decoding (the "cache" collection: one token per call, the
  cross-attention K/V cached from the encoder's output) against HF's full forward pass.

Two variants: T5 v1.1 (gated GELU-tanh MLP, untied output; relative buckets 32, max distance 128)
and the original T5 (relu MLP, tied output fed x * d_model ** -0.5; buckets 16, max distance 20, so
that the longer distances of the 32-token rows share the last bucket). Prints one JSON line per
variant and exits 1 when a difference exceeds --tolerance (1e-4).

The JAX half runs in this interpreter (llm_jax importable); the PyTorch half in TORCH_PY (default
/tmp/torchvenv/bin/python: torch, transformers, numpy), the same file with `--torch-half`, the
arrays going through an .npz file in a temporary directory:

    python scripts/t5_parity.py                      # PYTHONPATH=. to test a checkout's llm_jax
    python scripts/t5_parity.py --variant original --scan-layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES = {"vocab_size": 160, "n_layers": 2, "n_encoder_layers": 2, "n_decoder_layers": 3, "d_model": 32,
         "n_heads": 4, "d_ff": 64}
VARIANTS = {
    "v1.1": {},  # the t5 family's defaults
    "original": {"activation": "relu", "gated_mlp": False, "tie_embeddings": True, "relative_buckets": 16,
                 "relative_max_distance": 20},
}
BATCH, SEQ_LEN, TARGET_LEN = 2, 32, 16
ENCODER_PAD, DECODER_PAD = 8, 4  # padding at the end of the second row, on each side


# ----------------------------------------------------------------------------- JAX half


def _unrolled(stack: dict) -> dict:
    """A stack's parameters with scanned layers (one "layers" tree, leading axis) as layer_0, layer_1, ..."""
    import jax

    if "layers" not in stack:
        return stack
    layers, count = stack["layers"], jax.tree.leaves(stack["layers"])[0].shape[0]
    rest = {name: value for name, value in stack.items() if name != "layers"}
    return {**rest, **{f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count)}}


def hf_state_dict(params: dict, config) -> dict[str, np.ndarray]:
    """Hugging Face T5ForConditionalGeneration's weights from llm_jax's parameters (numpy, unboxed; scanned
    or not): the mapping `llm-jax hf export` writes (llm_jax/hf/t5.py)."""
    from llm_jax.hf import t5

    params = {name: _unrolled(value) if name in ("encoder", "decoder") else value for name, value in params.items()}
    return {name: np.ascontiguousarray(value, np.float32) for name, value in t5.params_to_hf(config, params)}


def hf_sizes(config) -> dict:
    """The llm_jax keys scripts/torch_baby_t5.hf_config reads, resolved for this config."""
    return {"model.vocab_size": config.vocab_size, "model.n_layers": config.n_layers,
            "model.n_encoder_layers": config.encoder_layers, "model.n_decoder_layers": config.decoder_layers,
            "model.d_model": config.d_model, "model.n_heads": config.n_heads, "model.d_ff": config.d_ff,
            "model.activation": config.resolved_activation, "model.gated_mlp": config.resolved_gated_mlp,
            "model.tie_embeddings": config.resolved_tie_embeddings,
            "model.relative_buckets": config.relative_buckets,
            "model.relative_max_distance": config.relative_max_distance, "model.norm_eps": config.resolved_norm_eps}


def make_batch(vocab_size: int) -> dict[str, np.ndarray]:
    """Two rows: the first full, the second padded at the end of both sides (segment id 0, pad id 0)."""
    rng = np.random.default_rng(0)
    encoder_segment_ids = np.ones((BATCH, SEQ_LEN), np.int32)
    encoder_segment_ids[1, SEQ_LEN - ENCODER_PAD:] = 0
    segment_ids = np.ones((BATCH, TARGET_LEN), np.int32)
    segment_ids[1, TARGET_LEN - DECODER_PAD:] = 0
    encoder_inputs = rng.integers(4, vocab_size, (BATCH, SEQ_LEN), dtype=np.int32) * encoder_segment_ids
    targets = rng.integers(4, vocab_size, (BATCH, TARGET_LEN), dtype=np.int32) * segment_ids
    inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)  # T5's start id 0
    positions = lambda length: np.broadcast_to(np.arange(length, dtype=np.int32), (BATCH, length)).copy()
    return {"encoder_inputs": encoder_inputs, "encoder_segment_ids": encoder_segment_ids,
            "encoder_positions": positions(SEQ_LEN), "inputs": inputs, "segment_ids": segment_ids,
            "positions": positions(TARGET_LEN)}


def jax_half(variant: str, scan_layers: bool) -> tuple[dict, dict, dict]:
    """(HF state dict, batch, {full, decode} logits) of a tiny llm_jax T5 of the variant."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llm_jax.config import ModelConfig
    from llm_jax.models.build import init_inputs, make_model
    from llm_jax.models.decoder import count_params

    config = ModelConfig(arch="t5", **SIZES, **VARIANTS[variant], scan_layers=scan_layers)
    model = make_model(config)
    tokens, kwargs = init_inputs(config, SEQ_LEN)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, **kwargs)["params"])
    leaves, treedef = jax.tree.flatten(params)
    factors = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(treedef, [leaf * jax.random.uniform(key, leaf.shape, leaf.dtype, 0.5, 1.5)
                                          for leaf, key in zip(leaves, factors)])
    batch = make_batch(config.vocab_size)
    j = {name: jnp.asarray(value) for name, value in batch.items()}
    variables = {"params": params}

    full = model.apply(variables, j["inputs"], j["positions"], j["segment_ids"], encoder_tokens=j["encoder_inputs"],
                       encoder_positions=j["encoder_positions"], encoder_segment_ids=j["encoder_segment_ids"])
    encoded = model.apply(variables, j["encoder_inputs"], j["encoder_positions"], j["encoder_segment_ids"],
                          method="encode")
    _, cache = model.apply(variables, jnp.zeros_like(j["inputs"]), encoded,
                           encoder_segment_ids=j["encoder_segment_ids"], decode=True, mutable=["cache"],
                           method="decode")
    steps = []
    for t in range(TARGET_LEN):
        logits, cache = model.apply({**variables, **cache}, j["inputs"][:, t:t + 1], encoded,
                                    encoder_segment_ids=j["encoder_segment_ids"], decode=True, mutable=["cache"],
                                    method="decode")
        steps.append(logits)
    decode = jnp.concatenate(steps, axis=1)

    state = hf_state_dict(jax.tree.map(np.asarray, params), config)
    logits = {"full": np.asarray(full), "decode": np.asarray(decode)}
    return state, batch, {"logits": logits, "params": count_params(params), "sizes": hf_sizes(config)}


# ----------------------------------------------------------------------------- PyTorch half


def torch_half(in_path: str, out_path: str) -> None:
    """Loads the state dict into HF's T5 and writes its logits on the batch (runs in TORCH_PY)."""
    import torch
    from torch_baby_t5 import hf_config, make_hf_t5  # this file's directory is on sys.path

    data = np.load(in_path)
    sizes = json.loads(str(data["sizes"]))
    model = make_hf_t5(hf_config(sizes)).eval()
    state = {name.removeprefix("state/"): torch.from_numpy(data[name]) for name in data.files
             if name.startswith("state/")}
    aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight",
               "lm_head.weight": "shared.weight"}  # the tied weights, listed under each of their names
    for name in model.state_dict():
        if name not in state and name in aliases:
            state[name] = state[aliases[name]]
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data["encoder_inputs"]).long(),
                       attention_mask=torch.from_numpy(data["encoder_segment_ids"] != 0).long(),
                       decoder_input_ids=torch.from_numpy(data["inputs"]).long(),
                       decoder_attention_mask=torch.from_numpy(data["segment_ids"] != 0).long(),
                       use_cache=False).logits
    np.savez(out_path, logits=logits.float().numpy(), params=sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- comparison


def compare(variant: str, scan_layers: bool, torch_py: str, tolerance: float) -> dict:
    state, batch, ours = jax_half(variant, scan_layers)
    with tempfile.TemporaryDirectory(prefix="t5_parity_") as tmp:
        in_path, out_path = os.path.join(tmp, "jax.npz"), os.path.join(tmp, "torch.npz")
        np.savez(in_path, sizes=json.dumps(ours["sizes"]), **batch, **{f"state/{k}": v for k, v in state.items()})
        result = subprocess.run([torch_py, __file__, "--torch-half", in_path, out_path], capture_output=True,
                                text=True)
        if result.returncode != 0:
            sys.exit(f"the PyTorch half failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        theirs = np.load(out_path)
        hf_logits, hf_params = theirs["logits"], int(theirs["params"])
    real = batch["segment_ids"] != 0  # decoder padding is not compared: HF lets it see the encoder's real tokens
    diffs = {name: float(np.abs(logits - hf_logits)[real].max()) for name, logits in ours["logits"].items()}
    return {"variant": variant, "scan_layers": scan_layers, "max_abs_diff_full": diffs["full"],
            "max_abs_diff_decode": diffs["decode"], "max_abs_logit": float(np.abs(hf_logits[real]).max()),
            "params": ours["params"], "hf_params": hf_params,
            "ok": max(diffs.values()) <= tolerance and ours["params"] == hf_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    parser.add_argument("--scan-layers", action="store_true", help="llm_jax's stacks as one scanned block")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest max abs difference of the logits")
    parser.add_argument("--torch-half", nargs=2, metavar=("IN_NPZ", "OUT_NPZ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_half:
        torch_half(*args.torch_half)
        return
    torch_py = os.environ.get("TORCH_PY", "/tmp/torchvenv/bin/python")
    reports = [compare(v, args.scan_layers, torch_py, args.tolerance)
               for v in (VARIANTS if args.variant == "both" else [args.variant])]
    for report in reports:
        print(json.dumps(report), flush=True)
    sys.exit(0 if all(r["ok"] for r in reports) else 1)


if __name__ == "__main__":
    main()
