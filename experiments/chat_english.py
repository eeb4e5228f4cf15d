"""Chat fine-tuning on the English dialogues of `chatterbot-corpus` (shipped by pip, no download).

    gptjax finetune --init-from runs/shakespeare --workdir runs/chat_english
    gptjax chat --workdir runs/chat_english

Takes the model shape, tokenizer and weights of the pretraining workdir; trains with the
assistant-only loss on packed conversations (~5% held out for validation by a stable hash),
lower learning rate and a short warmup. The corpus ships one malformed record (a trivia
question whose YAML swallowed its answer); the chatterbot source skips it and says so. Other
languages:
`--data.source=chatterbot:chinese` (the tokenizer's byte fallback keeps any text lossless).

Hardware: 2 CPU cores, nothing else running. Measured on experiments/shakespeare.py's model
as pretrained by `gptjax quickstart` (both with `matmul_precision="auto"`: bfloat16 matmul
operands on this CPU, an AMD EPYC with AVX512-BF16): 84 s for 300 steps of 16 packed rows (~3.5
steps/s, 25 steps per compiled call; in float32 it took 103-109 s; one step per call: ~2.2
minutes); assistant-token val loss 7.98 before fine-tuning (the pretrained model), then 3.38 /
3.17 / 3.11 at steps 100 / 200 / 300 (train loss 1.16: the English corpus is small and mostly
repeats). The quickstart's three exchanges (temperature 0.5, seed 0; the last quickstart run,
7 min 29 s in all):

    you> Hello, how are you?
    assistant> I am not a battle, but I can be a batteries.
    you> What is your name?
    assistant> I do not make everything to get when you stock me to me into my stock.
    you> Tell me a joke.
    assistant> I do not make everything to get when you cross a bot.

A 2.2M-parameter model after 10 CPU minutes: it answers in the corpus' register, not sensibly.

LoRA instead of full fine-tuning (`--model.lora_rank=8 --train.learning_rate=5e-3
--train.min_learning_rate=5e-4 --train.weight_decay=0.0`, same pretrained model, float32
matmuls): 110,592 trainable parameters (4.8%), 2.4 minutes, assistant val loss 7.99 → 4.42 /
4.08 / 3.92 — a rank-8 adapter on a model this small learns the register less well than full
fine-tuning.
"""

from gptjax.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        # The shape comes from the pretrained model; bfloat16 matmul operands where the CPU
        # multiplies them natively (model.matmul_precision), as in experiments/shakespeare.py.
        model=ModelConfig(matmul_precision="auto"),
        data=DataConfig(source="chatterbot:english", val_fraction=0.05),
        train=TrainConfig(
            steps=300,
            batch_size=16,
            learning_rate=5e-4,
            min_learning_rate=5e-5,
            warmup_steps=20,
            weight_decay=0.1,
            log_every_steps=25,
            steps_per_call=25,  # 25 optimizer steps per compiled call: faster on CPU
        ),
        eval=EvalConfig(
            every_steps=100,
            num_batches=8,
            sample_prompt="Hello, how are you?",
            sample_tokens=48,
            sample_temperature=0.7,
        ),
    )
