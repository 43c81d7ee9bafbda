"""`llm-jax harness WORKDIR --tasks T[,T]`: lm-evaluation-harness tasks scored on a run or an export.

The adapter is commands/lm_eval_model.py (the lm-eval model `llm_jax`); this command is lm-eval's
`simple_evaluate` with it, for the flags most runs need. Every lm-eval flag is in
`python -m llm_jax.commands.harness --model llm_jax --model_args workdir=WORKDIR ...`: lm-eval's own
command line (`lm_eval_main`) in a process that knows the model.

lm-eval indexes its ~15,000 built-in task configs before it runs (seconds); tasks all found in
`--include-path` folders are run without that index.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from llm_jax.config import ConfigError


def task_manager(tasks: list[str], include_path: list[str] | None):
    """(lm-eval's TaskManager that knows `tasks`, the task names with glob patterns expanded): the
    --include-path folders alone when they hold them all, else with lm-eval's own tasks. A name known
    to neither is refused, with the nearest names."""
    from lm_eval.tasks import TaskManager

    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise ConfigError(f"harness --include-path: no such folder {folder}")
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local, _expand(local, tasks)
    manager = TaskManager(include_path=include_path)
    for name in tasks:
        if not manager.match_tasks([name]):
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; nearest: {', '.join(near)}" if near else " (lm-eval ls tasks lists them)"
            raise ConfigError(f"harness --tasks: no task {name!r} in lm-eval's tasks or --include-path{hint}")
    return manager, _expand(manager, tasks)


def _expand(manager, tasks: list[str]) -> list[str]:
    names = []
    for name in tasks:
        names += manager.match_tasks([name]) if any(c in name for c in "*?[") else [name]
    return list(dict.fromkeys(names))


def run_harness(workdir: str, tasks: list[str], *, include_path: list[str] | None = None,
                num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                max_length: int | None = None, dtype: str | None = None, max_gen_toks: int | None = None,
                seed: int = 0, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's results (its `simple_evaluate` dict: results, configs, n-shot, versions, ...)."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("llm-jax harness needs EleutherAI's lm-evaluation-harness: pip install lm-eval") from None
    from llm_jax.commands import lm_eval_model

    if not tasks:
        raise ConfigError("harness --tasks: name at least one task")
    manager, tasks = task_manager(tasks, include_path)  # before the model is read: a wrong name costs seconds
    extra = {} if max_gen_toks is None else {"max_gen_toks": max_gen_toks}
    lm = lm_eval_model.LLMJaxLM(workdir=workdir, batch_size=batch_size, max_length=max_length, dtype=dtype,
                                seed=seed, **extra)
    # torch_random_seed=None: lm-eval would import torch (seconds) to seed a library the model does not use
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=log_samples, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=None, fewshot_random_seed=seed)


def write_results(results: dict[str, Any], output: str | None) -> str:
    """lm-eval's results table (returned, to print); the whole results as JSON in `output`."""
    from lm_eval.utils import handle_non_serializable, make_table

    if output is not None:
        Path(output).write_text(json.dumps(results, indent=1, default=handle_non_serializable,
                                           ensure_ascii=False) + "\n", encoding="utf-8")
    table = make_table(results)
    if "groups" in results:
        table += "\n" + make_table(results, "groups")
    return table


def lm_eval_main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`, the same flags) with the model `llm_jax` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    import llm_jax.commands.lm_eval_model  # noqa: F401  registers the model `llm_jax`

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    lm_eval_main()
