"""transformers continues a prompt with the same greedy text as `llm-jax generate`, from `llm-jax hf export`.

    llm-jax train
    llm-jax hf export runs/default runs/default-hf
    python scripts/hf_greedy_check.py runs/default-hf --workdir runs/default --prompt "def "

The transformers side loads OUT with AutoModelForCausalLM and AutoTokenizer alone (no llm_jax code),
encodes the prompt as the tokenizer does by default and continues it greedily; with --workdir, the
llm_jax side continues the same prompt from the run (as `llm-jax generate --temperature 0` does) and
the script exits 1 unless the prompt ids, the new ids (eos included, where one ends the text) and
the new text agree. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def transformers_side(hf_dir: str, prompt: str, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, num_beams=1)
    new_ids = out[0, prompt_ids.shape[1]:].tolist()
    return {"prompt_ids": prompt_ids[0].tolist(), "new_ids": new_ids,
            "text": tokenizer.decode(new_ids, skip_special_tokens=True)}


def llm_jax_side(workdir: str, prompt: str, max_new_tokens: int) -> dict:
    from llm_jax.commands.generate import generate_texts, prompt_ids
    from llm_jax.infer.generate import Decoding
    from llm_jax.infer.sampling import Sampling
    from llm_jax.train import loop

    setup, params, _ = loop.restore_for_inference(workdir, with_data=False)
    decoding = Decoding(max_new_tokens=max_new_tokens, sampling=Sampling(temperature=0.0))
    [record] = generate_texts(setup, params, [prompt], decoding, stops=[], seed=0, batch_size=1)
    ids = prompt_ids(setup.tokenizer, prompt, encoder_decoder=False)
    return {"prompt_ids": ids, "new_ids": record["tokens"], "text": record["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="the folder `llm-jax hf export` wrote")
    parser.add_argument("--workdir", default=None, help="the run (or llm-jax export) to compare with")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    theirs = transformers_side(args.hf_dir, args.prompt, args.max_new_tokens)
    result = {"prompt": args.prompt, "transformers": theirs}
    if args.workdir:
        ours = llm_jax_side(args.workdir, args.prompt, args.max_new_tokens)
        result["llm_jax"] = ours
        result["same"] = all(ours[key] == theirs[key] for key in ("prompt_ids", "new_ids", "text"))
    print(json.dumps(result))
    if args.workdir and not result["same"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
