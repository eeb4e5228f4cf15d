"""Chat fine-tuning on the English dialogues of `chatterbot-corpus` (shipped by pip, no download).

    gptjax finetune --init-from runs/shakespeare --workdir runs/chat_english
    gptjax chat --workdir runs/chat_english

Takes the model shape, tokenizer and weights of the pretraining workdir; trains with the
assistant-only loss on packed conversations (~5% held out for validation by a stable hash),
lower learning rate and a short warmup. The corpus has one malformed record (a trivia question
whose YAML swallowed its answer); it is skipped and counted. Other languages:
`--data.source=chatterbot:chinese` (the tokenizer's byte fallback keeps any text lossless).

Hardware: 2 CPU cores. Expected ~2 minutes after pretraining (300 steps of 16 packed rows);
the before/after assistant loss of a full quickstart run is still to be recorded here.
"""

from gptjax.config import Config, DataConfig, EvalConfig, TrainConfig


def get_config() -> Config:
    return Config(
        data=DataConfig(source="chatterbot:english", on_bad_record="skip", val_fraction=0.05),
        train=TrainConfig(
            steps=300,
            batch_size=16,
            learning_rate=5e-4,
            min_learning_rate=5e-5,
            warmup_steps=20,
            weight_decay=0.1,
            log_every_steps=10,
        ),
        eval=EvalConfig(
            every_steps=100,
            num_batches=8,
            sample_prompt="Hello, how are you?",
            sample_tokens=48,
            sample_temperature=0.7,
        ),
    )
