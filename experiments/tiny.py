"""Tiny: a 2-layer, 64-wide GPT on the embedded Shakespeare corpus, for tests and smoke runs.

    gptjax pretrain --config experiments/tiny.py --workdir runs/tiny --train.steps=60

Hardware: 2 CPU cores. Expected: tens of seconds including tokenizer training and compilation
on a cold cache; train_loss falls from ~6.3 (uniform over the 512-token vocabulary) within a
few dozen steps.
"""

import dataclasses

from gptjax.config import MODEL_PRESETS, Config, DataConfig, EvalConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=dataclasses.replace(MODEL_PRESETS["tiny"], max_len=64),
        data=DataConfig(source="shakespeare", tokenizer_type="bpe", tokenizer_vocab_size=512),
        train=TrainConfig(
            steps=200,
            batch_size=16,
            learning_rate=3e-3,
            min_learning_rate=3e-4,
            warmup_steps=10,
            log_every_steps=5,
        ),
        eval=EvalConfig(every_steps=100, num_batches=4, sample_tokens=40),
    )
