"""Training: pure step functions (``steps``), the one loop (``loop``), and the two tasks it
runs — ``pretrain`` on text and ``finetune`` on dialogues."""
