"""`llm-jax`: the command line. Thin on purpose; the work is in importable functions.

Every user error (bad config, missing file, unusable checkpoint) ends in exit code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from llm_jax.config import ConfigError

EXIT_USAGE = 2


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

    config_path, overrides = _split_config_args(args.rest)
    config = load_config(config_path, overrides)  # errors before any JAX work starts
    from llm_jax import distributed, trainer

    distributed.initialize(config.distributed)
    summary = trainer.train(config)
    import jax

    if jax.process_index() == 0:
        if summary["stopped_early"]:
            print(f"stopped at step {summary['step']}; the checkpoint is saved, run the same command to resume")
        else:
            print(f"eval loss {summary['eval_loss']:.4f} | eval perplexity {summary['eval_perplexity']:.2f}")
            print(f"sample ({config.train.sample_prompt!r} ...):\n{summary['sample']}")
    return 0


def _cmd_eval(args) -> int:
    from llm_jax import trainer

    setup, params, step = trainer.restore_for_inference(args.workdir, args.overrides)
    _, eval_fn = trainer.compile_steps(setup)
    result = {"step": step, **trainer.evaluate(setup, eval_fn, params, trainer.held_out_batches(setup))}
    print(json.dumps(result))
    return 0


def _cmd_generate(args) -> int:
    from llm_jax import trainer

    setup, params, _ = trainer.restore_for_inference(args.workdir)
    c = setup.config
    text = trainer.sample_text(setup, params, args.prompt, max_new_tokens=args.max_new_tokens,
                               temperature=c.train.temperature if args.temperature is None else args.temperature,
                               top_k=c.train.top_k if args.top_k is None else args.top_k, seed=args.seed)
    print(text)
    return 0


def _cmd_bench(args) -> int:
    from llm_jax.config import load_config

    config_path, overrides = _split_config_args(args.rest)
    config = load_config(config_path, overrides)
    from llm_jax import bench

    print(json.dumps(bench.run_bench(config, steps=args.steps, warmup=args.warmup)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-jax", description="Train transformer language models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model: llm-jax train [CONFIG.yaml] [key=value ...]")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate the newest checkpoint of a run directory")
    p.add_argument("workdir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.eval_batches=32")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with the newest checkpoint of a run directory")
    p.add_argument("workdir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="time the train step; prints one JSON object")
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    _setup_logging()
    from llm_jax.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"llm-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
