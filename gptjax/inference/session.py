"""A multi-turn chat kept inside the model's context window (used by ``gptjax chat``).

``ChatSession`` holds the message history; before each reply it drops the oldest
user/assistant turns (never the system prompt) until the rendered conversation plus room for
the reply fits ``model.max_len``, and says how many it dropped. A message that cannot fit
even alone is a ``GptjaxError`` that leaves the history as it was, so an interactive session
reports it and goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

from gptjax.chat_template import render_prompt
from gptjax.errors import GptjaxError
from gptjax.inference.generator import Generator
from gptjax.inference.sampling import Sampling


class ChatSession:
    """``session.send("Hi") -> reply``; ``session.reset()`` forgets all but the system prompt."""

    def __init__(
        self,
        generator: Generator,
        *,
        system: str | None = None,
        max_new_tokens: int = 128,
        **sampling: Unpack[Sampling],
    ):
        self.generator = generator
        self.system = [{"role": "system", "content": system}] if system else []
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.turns: list[dict[str, str]] = []
        self.dropped = 0  # turns dropped by the last send()

    def reset(self) -> None:
        self.turns = []

    def _fit(self) -> None:
        """Drops the oldest turns until prompt + reply room fits the context window."""
        max_len = self.generator.config.model.max_len
        # Room for the reply, but never more than half the window: a reply that outgrows it
        # simply ends at max_len.
        budget = max_len - min(self.max_new_tokens, max_len // 2)
        tokenizer = self.generator.tokenizer
        self.dropped = 0
        while len(render_prompt(self.system + self.turns, tokenizer)) > budget:
            if len(self.turns) <= 1:
                raise GptjaxError(
                    f"the message alone needs more than the {budget} tokens left for it in "
                    f"model.max_len={max_len}; shorten it or lower --max-new-tokens"
                )
            # Drop a whole exchange (user + assistant) so the history keeps its roles in turn.
            cut = 2 if len(self.turns) > 2 else 1
            self.turns = self.turns[cut:]
            self.dropped += cut

    def send(self, text: str, stream: Callable[[str], Any] | None = None) -> str:
        """Adds the user's ``text``, returns (and streams) the assistant's reply. A message that
        does not fit the context window raises ``GptjaxError`` and changes nothing."""
        before = list(self.turns)
        self.turns.append({"role": "user", "content": text})
        try:
            self._fit()
        except GptjaxError:
            self.turns, self.dropped = before, 0
            raise
        reply = self.generator.chat(
            self.system + self.turns,
            max_new_tokens=self.max_new_tokens,
            stream=stream,
            **self.sampling,
        )
        if reply.strip():
            self.turns.append({"role": "assistant", "content": reply})
        else:  # a blank reply is no turn (the template has no blank messages): forget both
            self.turns.pop()
        return reply
