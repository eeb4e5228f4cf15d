"""Chat fine-tuning of a real pretrained model: SmolLM2-135M-Instruct, LoRA, in its own format.

    pip install -e ".[hf]"
    gptjax import hf:HuggingFaceTB/SmolLM2-135M-Instruct --out runs/smollm2
    gptjax chat --workdir runs/smollm2                              # the model as published
    gptjax finetune --config chat_smollm2 --init-from runs/smollm2 --workdir runs/smollm2-chat
    gptjax chat --workdir runs/smollm2-chat
    gptjax export --workdir runs/smollm2-chat --out runs/smollm2-chat-hf --format hf

SmolLM2-135M-Instruct is a LLaMA-architecture model (30 layers × 576, 9 heads, 3 kv heads,
rope_theta 100000, tied embeddings, vocabulary 49,152) that ships a ChatML chat template; it
fine-tunes in that format (`<|im_start|>user ... <|im_end|>`), with the loss on the assistant's
tokens only. Rank-16 LoRA adapters on every attention and MLP matrix (alpha 32, learning rate
2e-4, no weight decay) train on the English dialogues of chatterbot-corpus in rows of 512 tokens;
`gptjax export --format hf` merges them, so the result loads in transformers as a plain model.
`--init-from hf:HuggingFaceTB/SmolLM2-135M-Instruct` imports and fine-tunes in one command; for
the base model use `hf:HuggingFaceTB/SmolLM2-135M` (same template-less path as GPT-2: gptjax's
chat tokens are added), for a larger one SmolLM2-360M-Instruct, Qwen/Qwen2.5-0.5B-Instruct or
TinyLlama/TinyLlama-1.1B-Chat-v1.0.

Hardware and time: 300 steps × 16 rows × 512 tokens ≈ 2.5M tokens ≈ 2e15 training FLOPs —
minutes on one GPU (a Colab T4 at ~15 TFLOP/s sustained: ~2-3 minutes), hours on 2 CPU cores.

Not run here: this machine has no internet, so the weights cannot be downloaded and no loss is
reported for them. Every step of the mechanism — import (logits and greedy generation equal to
transformers'), the model's own chat template (ids equal to `apply_chat_template`), LoRA and full
fine-tuning on one device and on an fsdp mesh, export back to Hugging Face format — is tested on
random weights of the same architectures in tests/test_hf.py.
"""

from gptjax.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        # Fine-tuning keeps the imported model's shape; only LoRA and dropout come from here.
        model=ModelConfig(lora_rank=16, lora_alpha=32.0),
        data=DataConfig(source="chatterbot:english", val_fraction=0.05, seq_len=512),
        train=TrainConfig(
            steps=300,
            batch_size=16,
            learning_rate=2e-4,
            min_learning_rate=2e-5,
            warmup_steps=20,
            weight_decay=0.0,
            log_every_steps=10,
        ),
        eval=EvalConfig(
            every_steps=100,
            num_batches=8,
            sample_prompt="What can you do?",
            sample_tokens=64,
            sample_temperature=0.7,
        ),
    )
