"""`llm-jax generate`'s host side (commands/generate.py): prompts from files, records, stop strings."""

import io
import json

import pytest
from test_generate import setup

from llm_jax.commands import generate as command
from llm_jax.config import Config, ConfigError
from llm_jax.infer.generate import Decoding
from llm_jax.infer.sampling import Sampling


class LetterTokenizer:
    """id i >= 10 is the letter chr(97 + (i - 10) % 26); bos 1, eos 2 decode to nothing."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [10 + (ord(ch) - 97) % 26 for ch in text]

    def decode(self, ids):
        return "".join(chr(97 + (int(i) - 10) % 26) for i in ids if int(i) >= 10)


@pytest.fixture(scope="module")
def bare():
    from llm_jax.parallel import mesh as mesh_lib
    from llm_jax.train import loop

    model, params, _ = setup("gpt2")
    config = Config(model=model.config)
    return loop.Setup(config=config, workdir=None, mesh=mesh_lib.make_mesh(config), model=model, tx=None,
                      schedule=None, abstract_state=None, state_shardings=None, tokenizer=LetterTokenizer(),
                      sources=None), params


def test_stop_strings_cut_text_tokens_and_logprob(bare):
    setup_, params = bare
    greedy = Decoding(max_new_tokens=6, sampling=Sampling(temperature=0.0))
    [plain] = command.generate_texts(setup_, params, ["xyz"], greedy, stops=[], seed=0, batch_size=2)
    assert plain["finish_reason"] == "length" and len(plain["tokens"]) == 6
    assert plain["text"] == LetterTokenizer().decode(plain["tokens"])
    stop = plain["text"][2:4]
    cut = plain["text"].find(stop)
    [stopped] = command.generate_texts(setup_, params, ["xyz"], greedy, stops=["zzzz", stop], seed=0, batch_size=2)
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == plain["text"][:cut]
    decode = LetterTokenizer().decode
    shortest = next(n for n in range(1, 7) if stop in decode(plain["tokens"][:n]))  # the token completing the stop
    assert stopped["tokens"] == plain["tokens"][:shortest] and shortest < 6
    assert stopped["logprob"] > plain["logprob"]  # fewer tokens' (negative) log-probabilities
    # Streaming shows the same text, the prompt first, and ends the line.
    out = io.StringIO()
    command.generate_texts(setup_, params, ["xyz"], greedy, stops=[stop], seed=0, batch_size=2, stream=out)
    assert out.getvalue() == "xyz" + plain["text"][:cut] + "\n"


def test_prompts_from_text_and_jsonl_files(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("one\n\ntwo words\n")
    assert command.read_prompts(lines) == ["one", "two words"]
    records = tmp_path / "p.jsonl"
    records.write_text('{"prompt": "a"}\n{"prompt": "b", "id": 3}\n')
    assert command.read_prompts(records) == ["a", "b"]
    records.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match="prompt"):
        command.read_prompts(records)


def test_records_are_jsonl(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [{"prompt": "p", "text": "t", "tokens": [3], "finish_reason": "eos", "logprob": -1.5}]
    command.write_records(records, str(out), encoder_decoder=False)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def test_learned_positions_cap_the_new_tokens_aloud(bare, caplog):
    setup_, params = bare  # max_len 16: bos + 9 prompt ids leave 6 (the program of the test above)
    with caplog.at_level("WARNING"):
        [record] = command.generate_texts(setup_, params, ["xyzxyzxyz"], Decoding(max_new_tokens=50, sampling=Sampling(
            temperature=0.0)), stops=[], seed=0, batch_size=1)
    assert len(record["tokens"]) == 6 and "generating 6 new tokens, not the 50 asked" in caplog.text
    with pytest.raises(ConfigError, match="no room"):
        command.generate_texts(setup_, params, ["x" * 15], Decoding(max_new_tokens=5), stops=[], seed=0, batch_size=1)
