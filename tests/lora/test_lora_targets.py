"""find_targets / LoraSpec: PEFT's matching rules, GPT-2 Conv1D, meta models, bad settings."""

from __future__ import annotations

import pytest
from lora_testlib import build_model
from peft.utils.other import get_pattern_key

from ferrytune.errors import ConfigError
from ferrytune.lora import LoraSpec, TargetInfo, find_targets


def test_suffix_match_and_all_linear_exclude_the_head():
    model = build_model("llama")
    qv = find_targets(model, LoraSpec(target_modules=["q_proj", "v_proj"]))
    assert list(qv) == [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]
    assert qv["model.layers.0.self_attn.v_proj"] == TargetInfo(32, 16, 8, 16, 2.0, "linear")  # 2 kv heads x 8
    every = find_targets(model, LoraSpec(target_modules="ALL-LINEAR"))
    assert len(every) == 14 and "lm_head" not in every
    # a dotted name matches a path suffix; a full path matches itself
    one = find_targets(model, LoraSpec(target_modules=["1.mlp.up_proj", "model.layers.0.self_attn.o_proj"]))
    assert list(one) == ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj"]


def test_regex_string_is_fullmatched():
    model = build_model("llama")
    got = find_targets(model, LoraSpec(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"))
    assert list(got) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_gpt2_conv1d_shapes():
    model = build_model("gpt2")
    got = find_targets(model, LoraSpec(target_modules=["c_attn"]))
    assert got["transformer.h.0.attn.c_attn"] == TargetInfo(32, 96, 8, 16, 2.0, "conv1d")
    every = find_targets(model, LoraSpec(target_modules="all-linear"))
    assert sorted({p.split(".", 3)[-1] for p in every}) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def test_works_on_meta_model():
    spec = LoraSpec(target_modules="all-linear", rank_pattern={"o_proj": 2})
    assert find_targets(build_model("qwen2", device="meta"), spec) == find_targets(build_model("qwen2"), spec)


@pytest.mark.parametrize(
    "patterns",
    [
        {"q_proj": 2, "proj": 3},
        {"proj": 3, "q_proj": 2},
        {r"layers\.1\.self_attn\.q_proj": 5, "self_attn.q_proj": 6},
        {"elf_attn.q_proj": 7, "mlp": 9, "mlp.*": 10},
    ],
)
def test_rank_pattern_follows_peft_get_pattern_key(patterns):
    model = build_model("llama")
    spec = LoraSpec(rank=4, alpha=8, target_modules="all-linear", rank_pattern=patterns, alpha_pattern=patterns)
    for path, info in find_targets(model, spec).items():
        peft_key = get_pattern_key(list(patterns), path)
        want = patterns.get(peft_key, 4)
        assert info.rank == want, (path, peft_key)
        assert info.alpha == patterns.get(peft_key, 8)
        assert info.scaling == info.alpha / info.rank


def test_rslora_scaling():
    info = find_targets(build_model("llama"), LoraSpec(rank=16, alpha=8, use_rslora=True))
    assert all(t.scaling == 8 / 4 for t in info.values())


def test_no_match_names_the_setting_and_lists_linear_modules():
    with pytest.raises(ConfigError) as err:
        find_targets(build_model("llama"), LoraSpec(target_modules=["query", "value"]))
    msg = str(err.value)
    assert "lora.target_modules" in msg and "\n" not in msg
    for name in ("q_proj", "v_proj", "down_proj", "lm_head"):
        assert name in msg
    with pytest.raises(ConfigError, match="lora.target_modules.*c_attn"):
        find_targets(build_model("gpt2"), LoraSpec(target_modules=["q_proj"]))


def test_non_linear_target_is_rejected():
    with pytest.raises(ConfigError, match="LlamaMLP"):
        find_targets(build_model("llama"), LoraSpec(target_modules=["mlp"]))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rank": 0}, "lora.rank"),
        ({"rank": 2.5}, "lora.rank"),
        ({"alpha": -1}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"target_modules": []}, "lora.target_modules"),
        ({"target_modules": "("}, "lora.target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "lora.rank_pattern"),
        ({"alpha_pattern": {"[": 1.0}}, "lora.alpha_pattern"),
    ],
)
def test_bad_spec(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        LoraSpec(**kwargs)
