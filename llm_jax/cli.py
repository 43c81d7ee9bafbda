"""`llm-jax`: the command line. Thin on purpose; the work is in importable functions.

Every user error (bad config, missing file, unusable checkpoint) ends in exit code 2 and one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path

from llm_jax.config import ConfigError

EXIT_USAGE = 2
EXIT_DIVERGED = 3  # the run stopped on too many non-finite steps in a row; its last good checkpoint is kept


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] key=value ... -> (config path or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "grain", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args) -> int:
    from llm_jax.config import load_config

    startup = args.startup  # main's: a signal before the first step, nothing to save, the run ends at once
    config_path, overrides = _split_config_args(args.rest)
    config = load_config(config_path, overrides)  # errors before any JAX work starts
    from llm_jax.parallel import distributed
    from llm_jax.train import loop

    distributed.initialize(config.distributed)
    import jax

    if jax.process_index() != 0:  # one log for the run: the others speak only of trouble
        logging.getLogger().setLevel(logging.WARNING)
    summary = loop.train(config)  # handles signals itself, in the loop after the current step
    startup.running()
    if jax.process_index() == 0:
        if summary["stopped_early"]:
            print(f"stopped at step {summary['step']}; the checkpoint is saved, run the same command to resume")
        else:
            line = f"eval loss {summary['eval_loss']:.4f} | eval perplexity {summary['eval_perplexity']:.2f}"
            for key in ("eval_accuracy", "eval_macro_f1", "eval_f1"):  # masked LM, classify, tag
                if key in summary:
                    line += f" | {key.replace('_', ' ')} {summary[key]:.4f}"
            print(line)
            if summary["sample"] is not None:
                what = "fill-mask" if config.objective == "mlm" else "sample"
                print(f"{what} ({config.train.sample_prompt!r}):\n{summary['sample']}")
    return 0


def _cmd_eval(args) -> int:
    from llm_jax.infer import scoring
    from llm_jax.train import loop

    setup, params, step = loop.restore_for_inference(args.workdir, args.overrides)
    if args.input is not None:  # whole texts, rolling windows: bits per byte of exactly that text
        if setup.config.objective == "mlm":
            raise ConfigError("eval --input scores text with a decoder or an encoder-decoder; "
                              f"{args.workdir} is a masked-LM run")
        texts = scoring.read_texts(args.input, args.text_key)
        with setup.context(split_batch=False):
            report = scoring.text_report(setup.model, params, setup.tokenizer, texts, batch_size=args.batch_size)
        print(json.dumps({"step": step, "input": args.input, **report}))
        return 0
    steps = loop.compile_steps(setup)
    batches = loop.held_out_batches(setup)
    result = {"step": step, **loop.evaluate(setup, steps.eval, params, batches)}
    if setup.config.objective == "clm":  # the targets are text: their bytes are known
        result["bits_per_byte"] = scoring.bits_per_byte(result["eval_loss"], batches, setup.tokenizer)
    print(json.dumps(result))
    return 0


def _decoding(args):
    """The generate options as a Decoding, checked before the checkpoint is read: seconds, not a minute.
    Unset sampling options take the run's train.temperature / train.top_k (filled in later)."""
    from llm_jax.infer.generate import Decoding
    from llm_jax.infer.sampling import Sampling

    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        sampling=Sampling(temperature=1.0 if args.temperature is None else args.temperature,
                          top_k=args.top_k or 0, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty),
        num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=early,
        num_return_sequences=args.num_return_sequences)
    try:
        decoding.check()
        if not (args.temperature is None or math.isfinite(args.temperature)):
            raise ValueError(f"generate --temperature must be >= 0 (0: greedy), got {args.temperature}")
        if args.batch_size < 1:
            raise ValueError(f"generate --batch-size must be positive, got {args.batch_size}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if bool(args.prompt) == bool(args.input):
        raise ConfigError("generate needs --prompt TEXT (one or more) or --input FILE, not both")
    return decoding


def _cmd_generate(args) -> int:
    import dataclasses

    decoding = _decoding(args)
    from llm_jax.commands import generate as generate_cmd

    prompts = args.prompt or generate_cmd.read_prompts(args.input)
    from llm_jax.train import loop

    setup, params, _ = loop.restore_for_inference(args.workdir, with_data=False)
    c = setup.config
    if c.model.family.encoder:
        raise ConfigError(f"generate needs a decoder (or an encoder-decoder); {args.workdir} holds an encoder "
                          f"(model.arch={c.model.arch}): use `llm-jax fill-mask {args.workdir} --text ...`")
    sampling = dataclasses.replace(
        decoding.sampling, temperature=c.train.temperature if args.temperature is None else args.temperature,
        top_k=c.train.top_k if args.top_k is None else args.top_k)
    decoding = dataclasses.replace(decoding, sampling=sampling)
    records = generate_cmd.generate_texts(setup, params, prompts, decoding, stops=args.stop or [], seed=args.seed,
                                          batch_size=args.batch_size, stream=sys.stdout if args.stream else None)
    if args.stream and args.output is None:
        return 0  # the texts are printed
    generate_cmd.write_records(records, args.output, encoder_decoder=c.model.family.encoder_decoder)
    return 0


def _cmd_fill_mask(args) -> int:
    from llm_jax.infer import fill_mask
    from llm_jax.train import loop

    fill_mask.check_top_k(args.top_k)  # before the checkpoint is read
    setup, params, _ = loop.restore_for_inference(args.workdir, with_data=False)
    if setup.config.objective != "mlm":
        raise ConfigError(f"fill-mask needs a masked-LM run (model.arch=bert); {args.workdir} trains "
                          f"{setup.config.objective} with model.arch={setup.config.model.arch}")
    print(fill_mask.describe(loop.fill_mask_text(setup, params, args.text, args.top_k)))
    return 0


def _cmd_harness(args) -> int:
    from llm_jax.commands import harness

    tasks = [t for group in args.tasks for t in group.split(",") if t]
    results = harness.run_harness(args.workdir, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                                  limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                                  dtype=args.dtype, max_gen_toks=args.max_gen_toks, seed=args.seed)
    print(harness.write_results(results, args.output))
    return 0


def _cmd_export(args) -> int:
    from llm_jax.commands.export import export_run

    print(json.dumps(export_run(args.workdir, args.out, best=args.best)))
    return 0


def _cmd_hf(args) -> int:
    from llm_jax.commands import hf

    if args.action == "import":
        print(json.dumps(hf.hf_import(args.hf_dir, args.out, dtype=args.dtype)))
    else:
        print(json.dumps(hf.hf_export(args.workdir, args.out)))
    return 0


def _cmd_quantize(args) -> int:
    from llm_jax.commands.quantize import quantize_run

    print(json.dumps(quantize_run(args.workdir, args.out, group_size=args.group_size)))
    return 0


def _cmd_prune(args) -> int:
    from llm_jax.commands.prune import prune_run

    print(json.dumps(prune_run(args.workdir, args.out, args.sparsity, structure=args.structure, scope=args.scope)))
    return 0


def _cmd_bench(args) -> int:
    from llm_jax.config import load_config

    config_path, overrides = _split_config_args(args.rest)
    config = load_config(config_path, overrides)
    if args.decode:
        from llm_jax.commands import decode_bench

        print(json.dumps(decode_bench.run_decode_bench(config, batch=args.batch, num_beams=args.num_beams,
                                                       prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                                       rounds=args.steps)))
        return 0
    from llm_jax.commands import bench

    print(json.dumps(bench.run_bench(config, steps=args.steps, warmup=args.warmup)))
    return 0


def _tokenizer_options(args) -> list[str]:
    """The `tokenizer train` options as the config overrides they stand for (they win over key=value)."""
    overrides = []
    if args.vocab_size is not None:
        overrides.append(f"model.vocab_size={args.vocab_size}")
    if args.model_type is not None:
        overrides.append(f"tokenizer.model_type={args.model_type}")
    if args.sample_bytes is not None:
        overrides.append(f"tokenizer.sample_bytes={args.sample_bytes}")
    if args.special_tokens is not None:
        symbols = [s for s in args.special_tokens.split(",") if s]
        overrides.append(f"tokenizer.user_defined_symbols={json.dumps(symbols)}")
    if args.byte_fallback is not None:
        overrides.append(f"tokenizer.byte_fallback={str(args.byte_fallback).lower()}")
    return overrides


def _cmd_tokenizer_train(args) -> int:
    from llm_jax.config import load_config

    config_path, overrides = _split_config_args(args.rest)
    config = load_config(config_path, [*overrides, *_tokenizer_options(args)])
    from llm_jax.commands import prepare

    print(json.dumps(prepare.tokenizer_train(config, args.out), indent=1))
    return 0


def _cmd_data_prepare(args) -> int:
    from llm_jax.config import load_config

    config_path, overrides = _split_config_args(args.rest)
    config = load_config(config_path, overrides)
    from llm_jax.commands import prepare

    print(json.dumps(prepare.data_prepare(config), indent=1))
    return 0


def _cmd_data_examples(args) -> int:
    from llm_jax.data import examples

    out = Path(args.out)
    summary = {"classify": examples.write_classify_example(out / "classify"),
               "tag": examples.write_tag_example(out / "tag")}
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_predict(args) -> int:
    from llm_jax.commands.predict import write_predictions

    count = write_predictions(args.workdir, args.input, args.output)
    if args.output is not None:
        print(f"wrote {count} predictions to {args.output}")
    return 0


def _cmd_plan(args) -> int:
    from llm_jax.config import load_config

    config_path, overrides = _split_config_args(args.rest)
    config = load_config(config_path, overrides)
    from llm_jax.commands import plan

    device_memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    if args.topology:
        devices = plan.topology_devices(args.topology)
    else:
        devices = plan.cpu_devices(_plan_device_count(config, args.devices))
    result = plan.run_plan(config, devices, device_memory)
    print(json.dumps(result) if args.json else plan.format_plan(result))
    return 0


def _plan_device_count(config, requested: int | None) -> int:
    if requested is not None:
        return requested
    sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if -1 in sizes:
        raise ConfigError("llm-jax plan needs the device count: pass --devices N or --topology NAME "
                          "(or set every mesh axis)")
    return sizes[0] * sizes[1] * sizes[2]


def _version() -> str:
    """The installed package's version, from its metadata (pyproject.toml), so it is never stated twice."""
    from importlib import metadata

    try:
        return metadata.version("llm_jax")
    except metadata.PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown (not installed; pip install -e .)"


def _config_keys_help() -> str:
    """Where the config keys are listed, and the sections they live in, for `train --help`."""
    from llm_jax.config import all_keys

    keys = all_keys()
    top = [k for k in keys if "." not in k]
    sections = list(dict.fromkeys(k.split(".")[0] for k in keys if "." in k))
    return ("config keys: the YAML file, then key=value overrides (values read as YAML scalars), e.g.\n"
            "  llm-jax train configs/tiny.yaml train.steps=200 model.n_layers=2 workdir=runs/x\n"
            f"top-level keys: {', '.join(top)}\n"
            f"sections: {', '.join(s + '.*' for s in sections)}\n"
            "Every key, its default and meaning: the dataclasses of llm_jax/config/schema.py; the common ones are in\n"
            "the README's Configuration section. A wrong key names the nearest valid one.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-jax", description="Train transformer language models with JAX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model: llm-jax train [CONFIG.yaml] [key=value ...]",
                       description="Train a model, or resume the run in workdir.", epilog=_config_keys_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate the newest checkpoint of a run directory")
    p.add_argument("workdir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.eval_batches=32")
    p.add_argument("--input", default=None, help="score this text file (one text) or JSONL file (a text per "
                   "line, in --text-key) instead of the held-out batches")
    p.add_argument("--text-key", default="text", help="the JSONL field of the text")
    p.add_argument("--batch-size", type=int, default=8, help="--input: windows scored together")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="a fine-tuned run's label (and probability) per example, or tags per word: "
                       "one JSON line each")
    p.add_argument("workdir")
    p.add_argument("--input", required=True, help="a file in the run's format (data.source: jsonl, csv, conll)")
    p.add_argument("--output", default=None, help="a JSONL file to write (default: stdout)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("generate", help="continue a prompt (decoders) or generate its target (encoder-decoders) "
                       "with the newest checkpoint of a run directory")
    p.add_argument("workdir")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (one compiled batch)")
    p.add_argument("--input", default=None, help="prompts: a line each, or JSONL with a \"prompt\" field")
    p.add_argument("--output", default=None, help="JSONL: prompt, text, tokens, finish_reason, logprob")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--min-new-tokens", type=int, default=0, help="eos is masked before this many")
    p.add_argument("--temperature", type=float, default=None, help="0: greedy (default: train.temperature)")
    p.add_argument("--top-k", type=int, default=None, help="0: off (default: train.top_k)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1: off")
    p.add_argument("--min-p", type=float, default=0.0, help="0: off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="Hugging Face's; 1: off")
    p.add_argument("--stop", action="append", help="cut the text where this string appears; repeatable")
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--num-beams", type=int, default=1, help="beam search (Hugging Face's semantics) above 1")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score: sum logprob / length**this")
    p.add_argument("--early-stopping", choices=["true", "false", "never"], nargs="?", const="true",
                   default="false", help="beam search: Hugging Face's early_stopping")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("fill-mask", help="the most likely tokens at each [MASK] of a text (masked-LM runs)")
    p.add_argument("workdir")
    p.add_argument("--text", required=True, help='e.g. "for i in [MASK](10):"')
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=_cmd_fill_mask)

    p = sub.add_parser("harness", help="score lm-evaluation-harness tasks on a run or an export (lm-eval's model "
                       "llm_jax; every lm-eval flag: python -m llm_jax.commands.harness --model llm_jax ...)")
    p.add_argument("workdir", help="a run directory (its newest checkpoint) or an export")
    p.add_argument("--tasks", action="append", required=True, help="task names, comma-separated; repeatable")
    p.add_argument("--include-path", action="append", default=None, help="a folder of task YAML files; repeatable")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (below 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="rows scored or decoded together")
    p.add_argument("--max-length", type=int, default=None, help="tokens per row (default: model.max_len)")
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. float32 (default: the run's model.dtype)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="generate_until's new tokens unless a task says")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write lm-eval's whole results here (JSON)")
    p.set_defaults(func=_cmd_harness)

    p = sub.add_parser("export", help="write the parameters of a run alone, for inference or init_from=OUT")
    p.add_argument("workdir")
    p.add_argument("out", help="a new directory")
    p.add_argument("--best", action="store_true", help="the checkpoint of the lowest eval loss (checkpoint.keep_best)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("hf", help="Hugging Face interop: llm-jax hf import HF_DIR OUT | hf export WORKDIR OUT")
    actions = p.add_subparsers(dest="action", required=True)
    p = actions.add_parser("import", help="a local Hugging Face model folder (config.json, safetensors, tokenizer) "
                           "-> an llm-jax export (for init_from=, generate, eval, predict, quantize)")
    p.add_argument("hf_dir")
    p.add_argument("out", help="a new directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="stored dtype of the parameters (default float32)")
    p.set_defaults(func=_cmd_hf)
    p = actions.add_parser("export", help="a run (its newest checkpoint) or a float export -> a folder that "
                           "transformers' Auto classes load (config.json, model.safetensors, tokenizer)")
    p.add_argument("workdir", help="a run directory or an llm-jax export")
    p.add_argument("out", help="a new directory")
    p.set_defaults(func=_cmd_hf)

    p = sub.add_parser("quantize", help="write an int8 export of a run (weight-only), for eval and generate")
    p.add_argument("workdir")
    p.add_argument("out", help="a new directory")
    p.add_argument("--group-size", type=int, default=None,
                   help="one scale per N input channels (default: one per output channel)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("prune", help="write a magnitude-pruned export of a run, with its mask")
    p.add_argument("workdir")
    p.add_argument("out", help="a new directory")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of the pruned kernels' weights zeroed")
    p.add_argument("--structure", default="unstructured", help="unstructured | 2:4")
    p.add_argument("--scope", default="layer", help="layer (a threshold per kernel) | global (one for all)")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("bench", help="time the train step (or with --decode, generation); prints one JSON object")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--decode", action="store_true", help="time generation instead (decode_tokens_per_sec); "
                   "--steps timed calls")
    p.add_argument("--batch", type=int, default=1, help="--decode: prompts decoded together")
    p.add_argument("--num-beams", type=int, default=1, help="--decode: beam search above 1")
    p.add_argument("--prompt-len", type=int, default=32, help="--decode: ids per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="--decode: generated per prompt")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("tokenizer", help="tokenizer tools: llm-jax tokenizer train [CONFIG] [key=value ...]")
    p = p.add_subparsers(dest="action", required=True).add_parser(
        "train", help="train the run's SentencePiece tokenizer; prints a summary (bytes per held-out token)")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--out", default=None, help="folder for spm.model/spm.vocab/summary.json (default: "
                   "WORKDIR/tokenizer, where llm-jax train looks; else train with tokenizer.path=OUT/spm.model)")
    p.add_argument("--vocab-size", type=int, default=None, help="model.vocab_size")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default=None, help="tokenizer.model_type")
    p.add_argument("--sample-bytes", type=int, default=None, help="tokenizer.sample_bytes: training text size")
    p.add_argument("--special-tokens", default=None, metavar="A,B,...",
                   help="tokenizer.user_defined_symbols: pieces never split, comma-separated")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="tokenizer.byte_fallback: unknown characters as bytes rather than <unk>")
    p.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("data", help="data tools: llm-jax data prepare [CONFIG] [key=value ...] | data examples OUT")
    actions = p.add_subparsers(dest="action", required=True)
    p = actions.add_parser(
        "prepare", help="local files -> TFDS ArrayRecord datasets and the run's tokenizer; prints the stats")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.set_defaults(func=_cmd_data_prepare)
    p = actions.add_parser("examples", help="write the fine-tuning examples made from Python's standard library: "
                           "OUT/classify (JSONL) and OUT/tag (CoNLL); prints their summaries")
    p.add_argument("out", help="a directory, e.g. data/examples (configs/classify_example.yaml reads it)")
    p.set_defaults(func=_cmd_data_examples)

    p = sub.add_parser("plan", help="compile the train step for a target mesh ahead of time; per-device memory")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--devices", type=int, default=None, help="plan on this many fake CPU devices")
    p.add_argument("--topology", default=None, help="a TPU topology, e.g. v5p:4x4x4 (needs libtpu)")
    p.add_argument("--device-memory", default=None, help="memory per device for the verdict, e.g. 80GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides after an option (`plan CONFIG --devices 8 mesh.tensor=2`): argparse ends the
    # positionals at the first option, so they come back unknown; they are the command's overrides.
    if unknown and hasattr(args, "rest") and all("=" in a and not a.startswith("-") for a in unknown):
        args.rest += unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from llm_jax.runtime.stop_signal import StartupInterrupted, StopSignal

    # `train` handles signals from here on: importing JAX (for the malloc tuning below) takes a second,
    # in which a Ctrl-C would end in a traceback and a SIGTERM would kill the run without a word.
    args.startup = StopSignal() if args.func is _cmd_train else contextlib.nullcontext()
    try:
        with args.startup:
            _setup_logging()
            from llm_jax.kernels import host_memory
            from llm_jax.runtime import faults

            for handler in logging.getLogger().handlers:  # a machine fault is told once, below, not by every thread
                if not any(isinstance(f, faults.QuietMachineFaults) for f in handler.filters):
                    handler.addFilter(faults.QuietMachineFaults())
            faults.quiet_aborted_saves()  # also keeps quiet a signal that lands in a callback of JAX's import
            with args.startup.deferred() if args.func is _cmd_train else contextlib.nullcontext():
                host_memory.tune_malloc_for_xla_cpu()  # imports JAX; before it starts its CPU client's threads
            return args.func(args)
    except StartupInterrupted as e:  # preemption is normal: nothing was started, nothing is lost
        print(f"llm-jax {args.command}: {e}", file=sys.stderr)
        if argv is None:  # the command itself, not a call from Python: the process is the run's own
            _end_process(0)
        return 0
    except Exception as e:
        code, line = _failure(e)  # re-raises what is neither the user's nor the machine's fault: a bug
        print(f"llm-jax {args.command}: error: {line}", file=sys.stderr)
        return code


def _end_process(code: int) -> None:
    """Ends the process now, skipping the interpreter's finalization, after a stop during start-up.

    A signal that lands while XLA compiles (the initial state, a first jit) interrupts JAX's wait
    for the compilation, which goes on in XLA's thread pool. At the interpreter's exit the garbage
    collector then destroys JAX's client under that compilation, and the process dies of a
    segmentation fault (exit code 139) after its line. Nothing is left to lose here: no step ran,
    so nothing was saved; the start-up's own clean-up (the workdir lock, the data and metrics
    writers) ran as the signal's exception passed; only the output needs flushing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _failure(e: Exception) -> tuple[int, str]:
    """(exit code, one line) of a command that failed with `e`; re-raises a bug, to show its traceback.

    Classes that bring JAX are imported only once something failed: `train` handles signals from
    its first line, and a Ctrl-C while main imported JAX would still have ended in a traceback.
    """
    from llm_jax.runtime import faults

    if isinstance(e, (ConfigError, FileNotFoundError, faults.MachineFault)):
        return EXIT_USAGE, str(e)
    from llm_jax.train.checkpoint import CheckpointError
    from llm_jax.train.fault_tolerance import NonFiniteError

    if isinstance(e, CheckpointError):
        return EXIT_USAGE, str(e)
    if isinstance(e, NonFiniteError):
        return EXIT_DIVERGED, str(e)
    # A fault of the machine (disk full, read-only path, a file where a folder should be) in any
    # layer, Python's or tensorstore's: one line naming the path and what to do.
    error = faults.os_error_in(e)
    if error is None:
        raise e
    return EXIT_USAGE, faults.describe(error)

if __name__ == "__main__":
    sys.exit(main())
