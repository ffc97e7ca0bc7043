import json

import pytest

from ferrytune.config import DataConfig
from ferrytune.data import encode, load_examples, load_jsonl, load_tokenizer, pad_id_for, verbalizer_token_ids
from ferrytune.errors import ConfigError, DataError


def cls_dataset(write_jsonl, *texts, label=1):
    return load_jsonl(write_jsonl("".join(json.dumps({"text": t, "label": label}) + "\n" for t in texts)))


def comp_dataset(write_jsonl, prompt, completion):
    return load_jsonl(write_jsonl(json.dumps({"prompt": prompt, "completion": completion}) + "\n", "c.jsonl"))


@pytest.mark.parametrize("tok_name,bos", [("gpt2_style", []), ("llama_style", [1])])
def test_classification_example(request, write_jsonl, tok_name, bos):
    tok = request.getfixturevalue(tok_name)
    ds = cls_dataset(write_jsonl, "a fine film", label=1)
    (ex,) = encode(ds, tok, template="{text} It was", verbalizer=[" terrible", " great"], max_length=64)
    assert list(ex.input_ids) == bos + tok.encode("a fine film It was", add_special_tokens=False)
    assert ex.loss_positions == (len(ex.input_ids) - 1,) and ex.loss_targets == (1,) and ex.label == 1
    assert ex.class_token_ids == tuple(tok.encode(w, add_special_tokens=False)[0] for w in (" terrible", " great"))
    assert ex.line == 1


def test_long_text_is_cut_from_the_left_keeping_the_template(gpt2_style, write_jsonl):
    words = [f"w{i}" for i in range(200)]
    ds = cls_dataset(write_jsonl, " ".join(words), "short")
    long_ex, short_ex = encode(ds, gpt2_style, max_length=20)
    assert len(long_ex.input_ids) <= 20
    text = gpt2_style.decode(long_ex.input_ids)
    assert text.endswith("w199 It was")  # the end of the text and the suffix survive
    assert text.split()[0] in words  # cut at a word start, not mid-word
    assert len(long_ex.input_ids) >= 17  # and not much more than needed was cut
    assert gpt2_style.decode(short_ex.input_ids) == "short It was"


def test_max_length_too_small_for_the_template(gpt2_style, write_jsonl):
    with pytest.raises(ConfigError, match=r"^data\.max_length: 3 tokens cannot hold the template"):
        encode(cls_dataset(write_jsonl, "x"), gpt2_style, template="{text} It was really quite", max_length=3)


def test_label_beyond_verbalizer_names_the_line(gpt2_style, write_jsonl):
    ds = load_jsonl(write_jsonl('{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n'))
    with pytest.raises(DataError, match=r"train\.jsonl:2: label 2 out of range: data\.verbalizer has 2 words"):
        encode(ds, gpt2_style)


def test_verbalizer_words_sharing_a_first_token(gpt2_style):
    assert verbalizer_token_ids(gpt2_style, [" great", " terrible"]) == (
        gpt2_style.encode(" great")[0],
        gpt2_style.encode(" terrible")[0],
    )
    with pytest.raises(ConfigError, match=r"^data\.verbalizer: ' great' and ' great!!' share their first token") as err:
        verbalizer_token_ids(gpt2_style, [" great", " great!!"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tok_name", ["gpt2_style", "llama_style", "no_specials"])
def test_completion_loss_positions_predict_the_completion(request, write_jsonl, tok_name):
    tok = request.getfixturevalue(tok_name)
    (ex,) = encode(comp_dataset(write_jsonl, "Q: capital of France?\nA:", " Paris."), tok, max_length=64)
    ids = list(ex.input_ids)
    prompt = tok.encode("Q: capital of France?\nA:", add_special_tokens=False)
    completion = tok.encode(" Paris.", add_special_tokens=False)
    bos = [1] if tok_name == "llama_style" else []
    eos = [] if tok_name == "no_specials" else [0]
    assert ids == bos + prompt + completion + eos
    assert list(ex.loss_targets) == completion + eos
    assert all(ids[p + 1] == t for p, t in zip(ex.loss_positions, ex.loss_targets))
    assert ex.loss_positions[0] == len(bos) + len(prompt) - 1
    assert ex.label is None and ex.class_token_ids is None


def test_completion_truncation_keeps_the_answer(gpt2_style, write_jsonl):
    prompt = " ".join(f"w{i}" for i in range(100))
    (ex,) = encode(comp_dataset(write_jsonl, prompt, " Paris."), gpt2_style, max_length=10)
    assert len(ex.input_ids) == 10
    assert list(ex.loss_targets) == gpt2_style.encode(" Paris.") + [0]
    assert ex.input_ids[: len(ex.input_ids) - len(ex.loss_targets)] == tuple(gpt2_style.encode(prompt)[-(10 - len(ex.loss_targets)):])


def test_empty_prompt_without_bos_skips_the_unpredictable_first_token(gpt2_style, llama_style, write_jsonl):
    ds = comp_dataset(write_jsonl, "", " Paris.")
    (ex,) = encode(ds, gpt2_style)
    assert ex.loss_positions[0] == 0 and list(ex.loss_targets) == list(ex.input_ids[1:])
    (ex,) = encode(ds, llama_style)
    assert ex.input_ids[0] == 1 and list(ex.loss_targets) == list(ex.input_ids[1:])


def test_load_tokenizer_roundtrip_and_errors(gpt2_style, tmp_path):
    gpt2_style.save_pretrained(tmp_path / "model")
    tok = load_tokenizer(tmp_path / "model")
    assert tok.encode("It was great") == gpt2_style.encode("It was great")
    assert pad_id_for(tok) == 0  # no pad token: falls back to EOS
    with pytest.raises(ConfigError, match=r"^model\.path: folder not found: "):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^model\.path: no tokenizer files in "):
        load_tokenizer(tmp_path / "empty")


def test_pad_id_prefers_pad_then_eos_then_zero(gpt2_style, no_specials):
    assert pad_id_for(gpt2_style) == gpt2_style.eos_token_id
    assert pad_id_for(no_specials) == 0


def test_load_examples_from_config(gpt2_style, write_jsonl):
    train = write_jsonl("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(6)))
    dev = write_jsonl("".join(json.dumps({"text": f"d{i}", "label": i % 2}) + "\n" for i in range(6)), "dev.jsonl")
    tr, ev = load_examples(DataConfig(train=train, eval=dev, eval_samples=4, max_length=16), gpt2_style)
    assert len(tr) == 6 and len(ev) == 4 and ev[0].line == 1
    tr, ev = load_examples(DataConfig(train=train), gpt2_style)
    assert ev is None


SMOLLM2 = __import__("pathlib").Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="models/SmolLM2-135M-Instruct not built")
def test_real_smollm2_tokenizer(write_jsonl):
    tok = load_tokenizer(SMOLLM2)
    a, b = verbalizer_token_ids(tok, [" terrible", " great"])
    assert a != b and tok.decode([b]) == " great"
    (ex,) = encode(comp_dataset(write_jsonl, "Q: capital of France?\nA:", " Paris."), tok)
    assert tok.decode(list(ex.loss_targets)) == " Paris." + tok.eos_token
