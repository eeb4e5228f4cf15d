"""Text in, text out: ``Generator`` wraps a model, its parameters and tokenizer, in the spirit of
Hugging Face's ``pipeline("text-generation")``; ``load(workdir)`` builds one from a training
workdir or an export. Streaming and stop strings are detokenised incrementally
(``_TextStream``); token-level decoding is ``gptjax/inference/decode.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Unpack

import jax
import numpy as np
from flax import linen as nn

from gptjax import chat_template, checkpoint, compile_cache, host_memory
from gptjax.errors import GptjaxError
from gptjax.inference.decode import decode_layout, generate_batch
from gptjax.inference.sampling import Sampling
from gptjax.model import GPT, abstract_params
from gptjax.workdir import read_workdir

DEFAULT_TEMPERATURE = 0.8  # text in, text out: a little less random than the raw softmax


class _TextStream:
    """Per-row incremental detokenisation: new ids in, finished text out.

    Text is held back while it ends in an incomplete UTF-8 character (byte-fallback pieces
    decode to U+FFFD until the last byte arrives) or in a prefix of a stop string; at a stop
    string the row ends and the text is cut just before it.
    """

    def __init__(self, tokenizer, stop: Sequence[str], emit: Callable[[str], Any] | None):
        self.tokenizer, self.stop, self.emit = tokenizer, tuple(s for s in stop if s), emit
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.final: str | None = None  # the text, once a stop string ended the row

    def push(self, token: int) -> bool:
        """Takes one id; returns True when a stop string has ended the row."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.final = text[: min(hits)]
            self._send(self.final)
            return True
        ready = len(text)
        if text.endswith("\ufffd"):
            ready = len(text.rstrip("\ufffd"))
        for s in self.stop:  # the longest tail that may grow into a stop string
            for k in range(min(len(s) - 1, ready), 0, -1):
                if text[:ready].endswith(s[:k]):
                    ready -= k
                    break
        self._send(text[:ready])
        return False

    def text(self) -> str:
        """The finished continuation; also emits whatever was held back."""
        text = self.final if self.final is not None else self.tokenizer.decode(self.ids)
        self._send(text)
        return text

    def _send(self, text: str) -> None:
        if self.emit is not None and len(text) > self.sent:
            self.emit(text[self.sent :])
        self.sent = max(self.sent, len(text))


class Generator:
    """A trained model with its tokenizer, in the spirit of ``pipeline("text-generation")``.

    ``gen("prompt", max_new_tokens=50) -> str`` (prompt + continuation), ``gen([...]) ->
    list[str]`` (one batch), ``gen.chat(messages) -> str`` (the assistant's reply).
    """

    def __init__(self, config, params, tokenizer, *, fast_layout: bool = True):
        """``fast_layout``: hold decoding's parameter layout (``decode_layout``: on CPU the
        kernels transposed, ~1.2x faster decoding steps, and a copy of every kernel, so the
        caller's tree may be dropped). ``False`` holds ``params`` itself: no copy, for a few
        samples from a model that is still training."""
        self.config = config
        self.model = GPT(config.model)
        self.params = decode_layout(params) if fast_layout else params
        self.tokenizer = tokenizer

    def logits(self, token_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Float32 logits ``[B, T, vocab_size]`` (the model's vocabulary, no padding columns) of
        ``token_ids`` ``[B, T]`` ints: entry ``[b, t]`` scores the token after ``t``. Rows may
        be right-padded: a position's logits depend only on the tokens up to it."""
        ids = np.asarray(token_ids)
        m = self.config.model
        if ids.ndim != 2 or (ids.size and ids.dtype.kind not in "iu"):
            raise GptjaxError(f"logits takes [B, T] int token ids, got {ids.dtype}{ids.shape}")
        if ids.size and not 0 <= ids.min() <= ids.max() < m.vocab_size:
            raise GptjaxError(f"token ids must be in [0, model.vocab_size={m.vocab_size})")
        if ids.shape[1] > m.max_len:
            raise GptjaxError(f"{ids.shape[1]} tokens exceed model.max_len={m.max_len}")
        out = _forward(self.params, ids.astype(np.int32), model=self.model)
        return np.asarray(out[..., : m.vocab_size], np.float32)

    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        max_new_tokens: int = 100,
        stop: Sequence[str] = (),
        stream: Callable[..., Any] | None = None,
        **sampling: Unpack[Sampling],
    ) -> str | list[str]:
        """Returns ``prompt`` and its continuation as text (a list for a list of prompts).

        Generation ends at EOS, at the first of the ``stop`` strings (cut off, not returned),
        after ``max_new_tokens`` or at ``model.max_len`` tokens in all. ``stream(text)`` (for
        a list: ``stream(i, text)``) receives the continuation piece by piece as it is made.
        ``sampling``: ``temperature`` (default 0.8; 0 = greedy), ``top_k``, ``top_p``, ``seed``.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        ids = [self.tokenizer.encode(p) or [self.tokenizer.bos_id] for p in prompts]
        stream_rows = (lambda _, text: stream(text)) if single and stream else stream
        replies = self._complete(
            ids, (self.tokenizer.eos_id,), stop, stream_rows, max_new_tokens, sampling
        )
        texts = [p + r for p, r in zip(prompts, replies, strict=True)]
        return texts[0] if single else texts

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        stream: Callable[[str], Any] | None = None,
        **sampling: Unpack[Sampling],
    ) -> str:
        """The assistant's next reply to ``messages`` (``[{"role", "content"}, ...]``).

        The conversation is rendered by ``chat_template.render_prompt`` and the reply ends at
        ``chat_template.stop_ids`` (end-of-turn, EOS). A conversation longer than
        ``model.max_len`` tokens is a ``GptjaxError``: trim the history
        (``gptjax/inference/session.py``). ``stream(text)`` receives the reply as it is made;
        ``sampling`` as for ``__call__``.
        """
        ids = chat_template.render_prompt(messages, self.tokenizer)
        stop_ids = chat_template.stop_ids(self.tokenizer)
        stream_rows = (lambda _, text: stream(text)) if stream else None
        return self._complete([ids], stop_ids, stop, stream_rows, max_new_tokens, sampling)[0]

    def _complete(self, ids, stop_ids, stop, stream, max_new_tokens, sampling) -> list[str]:
        """The continuation text of each prompt in ``ids``, cut at stop strings."""
        emit = (lambda i: functools.partial(stream, i)) if stream else (lambda i: None)
        rows = [_TextStream(self.tokenizer, stop, emit(i)) for i in range(len(ids))]
        hook = (lambda i, token: rows[i].push(token)) if stream or stop else None
        out = generate_batch(
            self.params,
            self.model,
            ids,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            vocab_limit=self.tokenizer.vocab_size,  # the model may have more rows
            on_token=hook,
            **{"temperature": DEFAULT_TEMPERATURE, **sampling},
        )
        if hook is None:
            for row, prompt, tokens in zip(rows, ids, out, strict=True):
                row.ids = tokens[len(prompt) :]
        return [row.text() for row in rows]


@functools.partial(jax.jit, static_argnames="model")
def _forward(params, tokens: jax.Array, *, model: GPT) -> jax.Array:
    return model.apply({"params": params}, tokens)  # [B, T, V]


def load(path: str | Path) -> Generator:
    """A ``Generator`` with the config, tokenizer and latest parameters of a training workdir
    or an export directory.

    On CPU, as for training (``gptjax/host_memory.py``): if nothing has started jax's backends
    yet, compiled calls run on the calling thread, and freed memory stays in the process, so a
    call reuses the last one's KV cache and temporaries instead of faulting them in again
    (GPT-2 124M, batch 32: the prefill, which allocates the 2.4 GB cache, 2.2 -> 0.8-1.0 s;
    128 tokens end to end 256-259 -> 267-272 tokens/s).
    """
    host_memory.run_calls_inline()  # before read_workdir starts jax's backends
    compile_cache.enable()  # a second session loads prefill and decode instead of compiling
    config, tokenizer = read_workdir(path)
    abstract = nn.meta.unbox(abstract_params(config.model))["params"]
    params = checkpoint.load_params(path, abstract)
    host_memory.keep_freed_memory()
    return Generator(config, params, tokenizer)
