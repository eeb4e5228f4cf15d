"""Conversations and the chat template: what a valid dialogue is and how it becomes token ids.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content":
str}`` (the OpenAI / Hugging Face chat layout; other keys are ignored). ``validate_messages``
says what is wrong with one, in words.

One format per model, the same for training, evaluation and chat:

* A tokenizer with its own chat template (a Hugging Face model that ships one, e.g. ChatML in
  SmolLM2 and Qwen2.5) renders with it: the Jinja template as transformers runs it, so the ids
  equal ``tokenizer.apply_chat_template(messages, tokenize=True)``.
* Otherwise gptjax's template, over the tokenizer's reserved role and end-of-turn tokens (in
  every gptjax tokenizer since pretraining; added to a Hugging Face base model such as GPT-2 when
  it is fine-tuned). They are control pieces that plain text never produces in gptjax's own
  tokenizers, so content that spells "<|user|>" stays text::

    <s> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

``render`` returns the ids and a loss mask that is 1 exactly on what the assistant writes (its
content and the marker closing its turn): the model learns to answer and to stop, never to write
the user's turns or the role markers. ``render_prompt`` renders the conversation so far plus the
opening of an assistant turn, for the model to continue; generation stops at any of
``stop_ids``. Packing rendered conversations into training batches is ``gptjax/data/sft.py``.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptjax.errors import GptjaxError
from gptjax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
Messages = Sequence[dict[str, Any]]


# ----------------------------------------------------------------------------- schema


def validate_messages(messages: Any, *, need_assistant: bool = True) -> str | None:
    """Why ``messages`` is not a valid conversation, or None if it is.

    Valid: a non-empty list of dicts, each with a ``role`` in ``ROLES`` and a non-blank str
    ``content``, and (if ``need_assistant``) at least one assistant message: a conversation
    without one carries no loss.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return f"messages must be a non-empty list of messages, got {_kind(messages)}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is {_kind(message)}, not an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}"
        if content is None:
            return f"message {i} ({role}) has no content"
        if not isinstance(content, str):
            return f"message {i} ({role}) content is {_kind(content)}, not a string"
        if not content.strip():
            return f"message {i} ({role}) has empty content"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to learn from)"
    return None


def _kind(value: Any) -> str:
    return "empty" if isinstance(value, (list, tuple)) and not value else type(value).__name__


def _checked(messages: Messages, *, need_assistant: bool) -> Messages:
    if reason := validate_messages(messages, need_assistant=need_assistant):
        raise GptjaxError(f"invalid conversation: {reason}")
    return messages


# ----------------------------------------------------------------------------- both formats


def render(messages: Messages, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A conversation → ``(ids [N] int32, mask [N] bool)``, mask 1 on what the assistant
    writes: its content and the marker that ends its turn.

    Raises ``GptjaxError`` (``validate_messages``'s reason) for an invalid conversation.
    """
    messages = _checked(messages, need_assistant=True)
    if tokenizer.chat_template:
        return _render_jinja(messages, tokenizer)
    return _assemble(messages, tokenizer.encode_batch([m["content"] for m in messages]), tokenizer)


def render_prompt(messages: Messages, tokenizer: Tokenizer) -> np.ndarray:
    """The conversation so far and the opening of an assistant turn: ids [N] int32 for the
    model to continue (``apply_chat_template(..., add_generation_prompt=True)``).

    ``messages`` need no assistant turn (a first user message is a prompt).
    """
    messages = _checked(messages, need_assistant=False)
    if tokenizer.chat_template:
        text = _jinja_text(messages, tokenizer, add_generation_prompt=True)
        return np.asarray(tokenizer.encode(text), np.int32)
    contents = tokenizer.encode_batch([m["content"] for m in messages])
    ids, _ = _assemble(messages, contents, tokenizer)
    return np.append(ids, np.int32(_chat_ids(tokenizer)["assistant"]))


def render_batch(
    conversations: Sequence[Messages], tokenizer: Tokenizer, *, encode_batch: int = 1024
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``render`` on every conversation (each validated); gptjax's template encodes the message
    contents in batches of ``encode_batch`` on all cores."""
    for messages in conversations:
        _checked(messages, need_assistant=True)
    if tokenizer.chat_template:
        return [_render_jinja(messages, tokenizer) for messages in conversations]
    flat = [m["content"] for messages in conversations for m in messages]
    encoded = []
    for start in range(0, len(flat), encode_batch):
        encoded += tokenizer.encode_batch(flat[start : start + encode_batch])
    rendered, k = [], 0
    for messages in conversations:
        rendered.append(_assemble(messages, encoded[k : k + len(messages)], tokenizer))
        k += len(messages)
    return rendered


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn in generation: the end-of-turn marker and the
    tokenizer's end-of-generation ids."""
    if not tokenizer.chat_template:
        return (_chat_ids(tokenizer)["end"], *tokenizer.eos_ids)
    return tuple(dict.fromkeys((*tokenizer.eos_ids, *_closing_ids(tokenizer))))


# ----------------------------------------------------------------------------- gptjax's


def _chat_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = tokenizer.chat_ids
    if ids is None:
        raise GptjaxError(
            "this model has no chat template and its vocabulary has no chat tokens; fine-tune "
            "it for chat first (`gptjax finetune --init-from ...` adds them)"
        )
    return ids


def _assemble(
    messages: Messages, contents: Sequence[Sequence[int]], tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """The template over already encoded contents; ``(ids [N] int32, mask [N] bool)``."""
    chat = _chat_ids(tokenizer)
    ids, mask = [tokenizer.bos_id], [False]
    for message, content in zip(messages, contents, strict=True):
        learn = message["role"] == "assistant"
        ids += [chat[message["role"]], *content, chat["end"]]
        mask += [False] + [learn] * (len(content) + 1)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


# ----------------------------------------------------------------------------- Jinja


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders
    its body. gptjax finds the assistant's text by rendering prefixes instead."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template as transformers compiles it (``utils/chat_template_utils.py``): sandboxed,
    trim_blocks and lstrip_blocks, loop controls, JSON without HTML escapes, raise_exception
    and strftime_now."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise GptjaxError(f"the model's chat template does not compile ({e})") from None


def _jinja_text(messages: Messages, tokenizer: Tokenizer, *, add_generation_prompt: bool) -> str:
    specials = tokenizer.special_tokens_map()
    try:
        return _compile(tokenizer.chat_template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **specials,
        )
    except jinja2.exceptions.TemplateError as e:
        raise GptjaxError(f"the model's chat template refused the conversation: {e}") from None


def _render_jinja(messages: Messages, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The template's text, tokenized once; the mask covers the characters that each assistant
    message adds: ``render(messages[:i + 1])`` minus ``render(messages[:i]) + the generation
    prompt`` (content and closing marker). Tokens are masked where their characters overlap
    it, transformers' rule for ``return_assistant_tokens_mask``."""
    full = _jinja_text(messages, tokenizer, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _jinja_text(messages[:i], tokenizer, add_generation_prompt=True) if i else ""
        turn = _jinja_text(messages[: i + 1], tokenizer, add_generation_prompt=False)
        if not (turn.startswith(head) and full.startswith(turn)):
            raise GptjaxError(
                f"the model's chat template renders message {i} differently once later "
                f"messages follow, so gptjax cannot tell which tokens the assistant wrote"
            )
        spans.append((len(head), len(turn)))
    ids, offsets = tokenizer.encode_with_offsets(full)
    mask = [any(start < e and end > s for s, e in spans) for start, end in offsets]
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


@functools.lru_cache(maxsize=16)
def _closing_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The special token that closes an assistant turn in this template (``<|im_end|>``), if
    any: the first token after the content of a probe exchange."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    head = _jinja_text(probe[:1], tokenizer, add_generation_prompt=True)
    turn = _jinja_text(probe, tokenizer, add_generation_prompt=False)
    after = turn[len(head) :].split("Hello", 1)[-1]
    ids = tokenizer.encode(after)
    return (ids[0],) if ids and ids[0] in tokenizer.special_ids else ()
