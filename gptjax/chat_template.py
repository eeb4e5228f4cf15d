"""Conversations and the chat template: what a valid dialogue is and how it becomes token ids.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content":
str}`` (the OpenAI / Hugging Face chat layout; other keys are ignored). ``validate_messages``
says what is wrong with one, in words.

The template (the same for training, evaluation and the chat CLI) uses the tokenizer's reserved
control pieces, which plain text can never produce, so content that spells "<|user|>" stays
text::

    <s> <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

``render`` returns the ids and a loss mask that is 1 exactly on assistant content and the
``<|end|>`` closing it: the model learns to answer and to stop, never to write the user's turns
or the role markers. ``render_prompt`` renders the conversation so far plus ``<|assistant|>``,
for the model to continue; generation stops at any of ``stop_ids``. Packing rendered
conversations into training batches is ``gptjax/data/sft.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

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


# ----------------------------------------------------------------------------- template


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn in generation: ``<|end|>`` and, defensively, ``</s>``."""
    return (tokenizer.end_of_turn_id, tokenizer.eos_id)


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    return {
        "system": tokenizer.system_id,
        "user": tokenizer.user_id,
        "assistant": tokenizer.assistant_id,
    }[role]


def _assemble(
    messages: Messages, contents: Sequence[Sequence[int]], tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """The template over already encoded contents; ``(ids [N] int32, mask [N] bool)``."""
    ids, mask = [tokenizer.bos_id], [False]
    for message, content in zip(messages, contents, strict=True):
        learn = message["role"] == "assistant"
        ids += [_role_id(tokenizer, message["role"]), *content, tokenizer.end_of_turn_id]
        mask += [False] + [learn] * (len(content) + 1)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def render(messages: Messages, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A conversation → ``(ids [N] int32, mask [N] bool)``, mask 1 on assistant content + end.

    Raises ``GptjaxError`` (``validate_messages``'s reason) for an invalid conversation.
    """
    messages = _checked(messages, need_assistant=True)
    return _assemble(messages, tokenizer.encode_batch([m["content"] for m in messages]), tokenizer)


def render_prompt(messages: Messages, tokenizer: Tokenizer) -> np.ndarray:
    """The conversation so far + ``<|assistant|>``: ids [N] int32 for the model to continue.

    ``messages`` need no assistant turn (a first user message is a prompt). The ids equal
    ``render``'s up to the assistant turn that the model is about to write.
    """
    messages = _checked(messages, need_assistant=False)
    contents = tokenizer.encode_batch([m["content"] for m in messages])
    ids, _ = _assemble(messages, contents, tokenizer)
    return np.append(ids, np.int32(tokenizer.assistant_id))


def render_batch(
    conversations: Sequence[Messages], tokenizer: Tokenizer, *, encode_batch: int = 1024
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``render`` on every conversation (each validated), encoding the message contents in
    batches of ``encode_batch`` on all cores."""
    for messages in conversations:
        _checked(messages, need_assistant=True)
    flat = [m["content"] for messages in conversations for m in messages]
    encoded = []
    for start in range(0, len(flat), encode_batch):
        encoded += tokenizer.encode_batch(flat[start : start + encode_batch])
    rendered, k = [], 0
    for messages in conversations:
        rendered.append(_assemble(messages, encoded[k : k + len(messages)], tokenizer))
        k += len(messages)
    return rendered
