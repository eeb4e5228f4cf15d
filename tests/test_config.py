"""Config tree: overrides, type checks, presets, validation and experiment loading."""

import dataclasses
import json
from pathlib import Path

import pytest

from gptjax.config import (
    MODEL_PRESETS,
    Config,
    apply_overrides,
    load_experiment,
    parse_override,
    valid_keys,
    validate,
)


def test_required_keys_exist():
    for key in [
        "train.steps",
        "train.batch_size",
        "train.seed",
        "train.learning_rate",
        "model.num_layers",
        "model.num_heads",
        "model.embed_dim",
        "model.max_len",
        "model.dropout_rate",
        "data.source",
        "eval.every_steps",
        "mesh.data",
        "mesh.fsdp",
        "mesh.tensor",
    ]:
        assert key in valid_keys()


def test_overrides_are_typed():
    c = apply_overrides(
        Config(),
        [
            "--train.steps=200",
            "--model.num_layers=2",
            "--train.learning_rate=1",
            "--data.source=text:corpus.txt",
            "--model.tie_embeddings=false",
            "--eval.sample_prompt=JULIET:",
        ],
    )
    assert c.train.steps == 200 and c.model.num_layers == 2
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
    assert c.data.source == "text:corpus.txt"
    assert c.model.tie_embeddings is False
    assert c.eval.sample_prompt == "JULIET:"


def test_unknown_key_names_the_closest():
    with pytest.raises(ValueError, match=r"unknown config key 'train.step'.*'train.steps'"):
        apply_overrides(Config(), ["--train.step=3"])
    with pytest.raises(ValueError, match=r"'modle.num_layers'.*'model.num_layers'"):
        apply_overrides(Config(), ["--modle.num_layers=3"])


@pytest.mark.parametrize(
    "arg, match",
    [
        ("--train.steps=abc", r"train.steps='abc' has type str, expected int"),
        ("--train.steps=1.5", r"train.steps=1.5 has type float, expected int"),
        ("--model.dropout_rate=high", r"expected float"),
        ("--train.steps", r"not of the form --section.key=value"),
    ],
)
def test_bad_values(arg, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(Config(), [arg])


def test_preset_override_then_fields():
    c = apply_overrides(Config(), ["--model.preset=gpt2", "--model.num_layers=2"])
    assert c.model.embed_dim == 768 and c.model.num_layers == 2 and c.model.preset == "gpt2"
    with pytest.raises(ValueError, match="model.preset='gpt5' is unknown"):
        apply_overrides(Config(), ["--model.preset=gpt5"])


def test_round_trip_through_dict():
    c = apply_overrides(Config(), ["--model.preset=llama", "--train.steps=7"])
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("name", ["tiny", "shakespeare", "shakespeare_char", "chat_english"])
def test_experiments_round_trip_through_dict(name):
    # A workdir's config.json is read back with from_dict: an experiment's own model (its
    # preset name is not a MODEL_PRESETS row) must survive it (quickstart's finetune did not).
    c = load_experiment(name)
    assert Config.from_dict(json.loads(c.to_json())) == c


EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "experiments").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_is_valid_as_the_cli_checks_it(name):
    # Fine-tuning experiments take the model's shape from --init-from: their data.seq_len (512
    # for SmolLM2) is checked against that model, not against this config's default max_len.
    validate(load_experiment(name), fine_tune=name.startswith("chat_"))


def test_presets_are_valid_and_derived_values():
    for name, m in MODEL_PRESETS.items():
        validate(dataclasses.replace(Config(), model=m))
        assert m.preset == name
    gpt2 = MODEL_PRESETS["gpt2"]
    assert gpt2.padded_vocab_size == 50304 and gpt2.hidden_dim == 3072 and gpt2.head_dim == 64
    llama = MODEL_PRESETS["llama"]
    assert llama.kv_heads == 2 and llama.hidden_dim == 1024


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--model.num_heads=5"], r"model.num_heads=5 must divide model.embed_dim=256"),
        (["--model.num_kv_heads=3"], r"num_kv_heads=3 must divide model.num_heads=4"),
        (["--train.batch_size=30", "--train.grad_accum_steps=4"], r"divisible by"),
        (["--model.position=alibi"], r"model.position='alibi' is not one of"),
        (["--model.matmul_precision=int8"], r"model.matmul_precision='int8' is not one of"),
        (["--train.steps=0"], r"train.steps=0 must be at least 1"),
    ],
)
def test_validate_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(apply_overrides(Config(), overrides))


def test_load_experiment_by_path_and_name(tmp_path):
    assert load_experiment("tiny").model.preset == "tiny"
    assert load_experiment("experiments/tiny.py").model.num_layers == 2
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_experiment(str(bad))
    with pytest.raises(ValueError, match="config 'nosuch' not found"):
        load_experiment("nosuch")


def test_parse_override_literals():
    assert parse_override("--a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("--a.b=hello world") == ("a.b", "hello world")
