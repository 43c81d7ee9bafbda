"""Decode speed of llm_jax against Hugging Face `generate` (PyTorch) on the same GPT-2 weights, side by side.

Cases: greedy at batch 1 and batch 16, beam search with 4 beams at batch 1 (each: `--prompt-len` random
ids, exactly `--new-tokens` new ones, no eos). Both sides time the whole `generate` call of a batch
(prefill included), the median of `--rounds` calls after a warm-up call, and count new tokens of all
rows per second (beam search: a prompt's best beam), as `llm-jax bench --decode` does.

1. The JAX side (JAX_PY, default this Python; llm_jax installed) builds the config's model with random
   weights (normal, --init-std; default the config's model.init_std), writes them under Hugging Face's
   GPT-2 names (the mapping: `hf_gpt2_weights`), times the cases and measures the memory bandwidth
   (a large numpy copy: bytes read + written per second).
2. The PyTorch side (TORCH_PY, default /tmp/torchvenv/bin/python; torch and transformers) builds
   `GPT2LMHeadModel` from a `GPT2Config` of the same sizes, loads those weights, times the same cases.
3. Prints a table (tokens/s, ratio jax/torch, whether the generated ids agree) and a JSON line; the
   physical bound of batch-1 decoding is bandwidth / bytes of weights (every weight is read once per
   new token), and `bound_fraction` is how close batch-1 greedy comes to it.

`--check` runs a tiny model (2 layers, d_model 64, vocab 512) with peaked weights (--init-std 0.3) and
adds beam search with an eos, length penalties and early stopping, and the repetition penalty, so that
ids must agree token for token: Hugging Face's semantics (infer/beam_search.py, infer/sampling.py) on
the same weights.

    python scripts/decode_vs_torch.py                       # configs/baby_gpt.yaml
    python scripts/decode_vs_torch.py --check --rounds 1    # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK_OVERRIDES = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=256",
                   "model.vocab_size=512", "model.max_len=128", "train.seq_len=64"]


def cases(check: bool) -> list[dict]:
    """name, batch, num_beams, and for beams with an eos: length_penalty, early_stopping."""
    out = [{"name": "greedy_b1", "batch": 1, "num_beams": 1}, {"name": "greedy_b16", "batch": 16, "num_beams": 1},
           {"name": "beam4_b1", "batch": 1, "num_beams": 4}]
    if check:
        out.append({"name": "beam4_eos", "batch": 2, "num_beams": 4, "eos": True, "length_penalty": 2.0,
                    "early_stopping": True})
        out.append({"name": "beam3_eos_heuristic", "batch": 2, "num_beams": 3, "eos": True, "length_penalty": 0.5,
                    "early_stopping": False})
        out.append({"name": "greedy_repetition", "batch": 2, "num_beams": 1, "repetition_penalty": 1.5})
        out.append({"name": "beam3_repetition", "batch": 2, "num_beams": 3, "repetition_penalty": 1.5})
    return out


# ----------------------------------------------------------------------------- JAX side


def hf_gpt2_weights(params, n_layers: int) -> dict:
    """llm_jax gpt2 parameters (unscanned, numpy) -> Hugging Face GPT2LMHeadModel's state dict (numpy).
    GPT-2's Conv1D weights are [in, out]: c_attn is q, k, v side by side, heads major."""
    import numpy as np

    w = {"transformer.wte.weight": params["embed"]["embedding"],
         "transformer.wpe.weight": params["pos_embed"]["embedding"],
         "transformer.ln_f.weight": params["final_norm"]["scale"],
         "transformer.ln_f.bias": params["final_norm"]["bias"]}
    for i in range(n_layers):
        layer, h = params[f"layer_{i}"], f"transformer.h.{i}."
        attn = layer["attn"]
        e = np.asarray(attn["query"]["kernel"]).shape[0]
        w[h + "ln_1.weight"], w[h + "ln_1.bias"] = layer["attn_norm"]["scale"], layer["attn_norm"]["bias"]
        w[h + "attn.c_attn.weight"] = np.concatenate(
            [np.asarray(attn[n]["kernel"]).reshape(e, -1) for n in ("query", "key", "value")], axis=1)
        w[h + "attn.c_attn.bias"] = np.concatenate([np.asarray(attn[n]["bias"]).reshape(-1)
                                                   for n in ("query", "key", "value")])
        w[h + "attn.c_proj.weight"] = np.asarray(attn["out"]["kernel"]).reshape(-1, e)
        w[h + "attn.c_proj.bias"] = attn["out"]["bias"]
        w[h + "ln_2.weight"], w[h + "ln_2.bias"] = layer["mlp_norm"]["scale"], layer["mlp_norm"]["bias"]
        w[h + "mlp.c_fc.weight"], w[h + "mlp.c_fc.bias"] = layer["mlp"]["fc"]["kernel"], layer["mlp"]["fc"]["bias"]
        w[h + "mlp.c_proj.weight"] = layer["mlp"]["proj"]["kernel"]
        w[h + "mlp.c_proj.bias"] = layer["mlp"]["proj"]["bias"]
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def memory_bandwidth(size_bytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes per second of a large numpy copy (each byte read once and written once), the best of rounds."""
    import numpy as np

    src = np.ones(size_bytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def jax_side(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llm_jax.commands import decode_bench
    from llm_jax.config import load_config
    from llm_jax.infer import beam_search
    from llm_jax.infer import generate as gen
    from llm_jax.infer.sampling import Sampling
    from llm_jax.train import loop

    overrides = [*(CHECK_OVERRIDES if args.check else []), "model.scan_layers=false", f"workdir={args.work}/run",
                 *args.overrides]
    config = load_config(args.config, overrides)
    m = config.model
    if m.arch != "gpt2" or m.n_kv_heads not in (None, m.n_heads):
        sys.exit("decode_vs_torch maps gpt2 models only")
    setup = loop.build(config, with_data=False)
    std = args.init_std if args.init_std is not None else m.init_std
    draws = np.random.default_rng(1)

    def draw(path, a):  # norms as initialised (scale 1, bias 0); the rest normal with std
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.full(a.shape, 1.0 if "scale" in name else 0.0, a.dtype)
        return jnp.asarray(draws.standard_normal(a.shape) * std, a.dtype)

    params = decode_bench._random_params(setup) if std == m.init_std else jax.tree_util.tree_map_with_path(
        draw, setup.abstract_state.params)
    host = jax.tree.map(np.asarray, params)
    np.savez(f"{args.work}/weights.npz", **hf_gpt2_weights(host, m.n_layers))
    rng = np.random.default_rng(config.seed)
    results, shared = {}, {"config": {"vocab_size": m.vocab_size, "n_positions": m.max_len, "n_embd": m.d_model,
                                      "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.d_ff,
                                      "layer_norm_epsilon": m.resolved_norm_eps}, "cases": []}
    for case in cases(args.check):
        prompts = rng.integers(4, m.vocab_size, size=(case["batch"], args.prompt_len)).tolist()
        k = case["num_beams"]
        eos_id = None
        if case.get("eos"):  # an id greedy decoding reaches early: beams end at different lengths
            greedy = gen.generate_batch(setup.model, params, prompts[:1], gen.Decoding(
                args.new_tokens, sampling=Sampling(temperature=0.0)), rng=jax.random.key(0), batch_size=1)
            eos_id = greedy[0][0].tokens[min(3, args.new_tokens - 1)]
        sampling = Sampling(temperature=0.0, repetition_penalty=case.get("repetition_penalty", 1.0))
        decoding = gen.Decoding(max_new_tokens=args.new_tokens, num_beams=k, sampling=sampling,
                                length_penalty=case.get("length_penalty", 1.0),
                                early_stopping=case.get("early_stopping", False))
        ids, real = gen.pad_prompts([p for p in prompts for _ in range(k)], args.prompt_len, left=True)
        ids, real, eos = jnp.asarray(ids), jnp.asarray(real), jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)

        if k > 1:
            call = functools.partial(beam_search.search_rows, m, params, ids, real, eos, decoding=decoding)
        else:
            call = functools.partial(gen.sample_rows, m, params, ids, real, jax.random.key(0), eos,
                                     decoding=decoding)
        with setup.context(split_batch=False):
            out = jax.block_until_ready(call())
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - t0)
        out = jax.device_get(out)
        if k > 1:
            tokens = [out[0][b, 0, :out[1][b, 0]].tolist() for b in range(case["batch"])]
        else:
            tokens = [out[0][b, :out[1][b]].tolist() for b in range(case["batch"])]
        results[case["name"]] = {"tokens_per_sec": case["batch"] * args.new_tokens / statistics.median(times),
                                 "tokens": tokens}
        shared["cases"].append({**case, "prompts": prompts, "eos_id": eos_id})
    param_bytes = sum(int(v.nbytes) for v in jax.tree.leaves(host))
    Path(f"{args.work}/cases.json").write_text(json.dumps(shared))
    print(json.dumps({"results": results, "param_bytes": param_bytes, "bandwidth": memory_bandwidth(),
                      "device": str(jax.devices()[0].platform)}))


# ----------------------------------------------------------------------------- PyTorch side


def torch_side(args) -> None:
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    shared = json.loads(Path(f"{args.work}/cases.json").read_text())
    config = GPT2Config(**shared["config"], activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    weights = np.load(f"{args.work}/weights.npz")
    state = {k: torch.from_numpy(weights[k]) for k in weights.files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith("attn.bias")]  # tied; mask buffers
    if missing or unexpected:
        sys.exit(f"weights do not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    results = {}
    for case in shared["cases"]:
        input_ids = torch.tensor(case["prompts"], dtype=torch.long)
        options = dict(max_new_tokens=args.new_tokens, do_sample=False, num_beams=case["num_beams"],
                       attention_mask=torch.ones_like(input_ids), pad_token_id=0,
                       length_penalty=case.get("length_penalty", 1.0),
                       repetition_penalty=case.get("repetition_penalty", 1.0),
                       early_stopping=case.get("early_stopping", False))
        if case["eos_id"] is not None:
            options["eos_token_id"] = case["eos_id"]
        else:
            options["min_new_tokens"] = args.new_tokens
        with torch.inference_mode():
            out = model.generate(input_ids, **options)
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                model.generate(input_ids, **options)
                times.append(time.perf_counter() - t0)
        new = out[:, input_ids.shape[1]:].tolist()
        if case["eos_id"] is not None:  # up to and with the first eos (the rest is padding)
            new = [row[:row.index(case["eos_id"]) + 1] if case["eos_id"] in row else row for row in new]
        results[case["name"]] = {"tokens_per_sec": case["batch"] * args.new_tokens / statistics.median(times),
                                 "tokens": new}
    print(json.dumps({"results": results, "torch": torch.__version__, "threads": torch.get_num_threads()}))


# ----------------------------------------------------------------------------- driver


def _run(python: str, side: str, args, extra: list[str]) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--work", args.work, "--config", args.config,
           "--rounds", str(args.rounds), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           *extra, *args.overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--config", default="configs/baby_gpt.yaml")
    parser.add_argument("--check", action="store_true", help="a tiny peaked model; ids must agree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--init-std", type=float, default=None)
    parser.add_argument("--side", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "jax":
        return jax_side(args)
    if args.side == "torch":
        return torch_side(args)
    jax_py = os.environ.get("JAX_PY", sys.executable)
    torch_py = os.environ.get("TORCH_PY", "/tmp/torchvenv/bin/python")
    extra = ["--check"] if args.check else []
    if args.check and args.init_std is None:
        args.init_std = 0.3
    if args.init_std is not None:
        extra += ["--init-std", str(args.init_std)]
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        ours = _run(jax_py, "jax", args, extra)
        theirs = _run(torch_py, "torch", args, extra)
    bound = ours["bandwidth"] / ours["param_bytes"]
    table = {}
    print(f"{'case':22s} {'jax tok/s':>12s} {'torch tok/s':>12s} {'ratio':>7s}  ids agree")
    for name, mine in ours["results"].items():
        other = theirs["results"][name]
        agree = sum(a == b for a, b in zip(mine["tokens"], other["tokens"]))
        table[name] = {"jax": mine["tokens_per_sec"], "torch": other["tokens_per_sec"],
                       "ratio": mine["tokens_per_sec"] / other["tokens_per_sec"],
                       "rows_agree": f"{agree}/{len(mine['tokens'])}"}
        print(f"{name:22s} {mine['tokens_per_sec']:12.1f} {other['tokens_per_sec']:12.1f} "
              f"{table[name]['ratio']:7.2f}  {agree}/{len(mine['tokens'])}")
    print(f"batch-1 bound: {bound:.1f} tok/s ({ours['param_bytes'] / 1e6:.1f} MB of weights per token at "
          f"{ours['bandwidth'] / 1e9:.1f} GB/s); greedy_b1 reaches {table['greedy_b1']['jax'] / bound:.1%}")
    print(json.dumps({"cases": table, "param_bytes": ours["param_bytes"], "bandwidth_bytes_per_sec": ours["bandwidth"],
                      "batch1_bound_tokens_per_sec": bound, "bound_fraction": table["greedy_b1"]["jax"] / bound,
                      "torch": theirs["torch"], "torch_threads": theirs["threads"]}))
    if args.check and not all(row["rows_agree"].split("/")[0] == row["rows_agree"].split("/")[1]
                              for row in table.values()):
        sys.exit("generated ids differ between llm_jax and Hugging Face")


if __name__ == "__main__":
    main()
