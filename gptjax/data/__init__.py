"""Data: pretraining text and dialogue sources, tokenized and batched with grain.

``text`` (shakespeare, text:PATH) and ``tfds_catalog`` (tfds:NAME) give documents; ``pipeline``
tokenizes them and cuts training windows; ``dialogues`` reads chat data (chatterbot, jsonl,
tfds) and ``sft`` packs rendered conversations into batches with an assistant-only loss.
"""
