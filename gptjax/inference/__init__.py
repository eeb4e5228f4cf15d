"""Inference: ``sampling`` (one token from logits), ``decode`` (prefill + compiled KV-cache
loop, ids in and out), ``generator`` (text in and out, ``gptjax.load``) and ``session`` (a
multi-turn chat kept inside the context window)."""
