"""nanoGPT's CPU recipe on tiny-shakespeare, character level, for a like-for-like comparison.

    gptjax pretrain --config experiments/shakespeare_char.py --workdir runs/shakespeare_char

Reproduces `python train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0` (nanoGPT README): one token
per character, first 90% of the characters for training and the last 10% for validation, 4
layers × 4 heads × 128 dims, context 64, batch 12, 2000 steps, AdamW (β2 0.99, weight decay 0.1)
at 1e-3 with 100 warmup steps and cosine decay to 1e-4, clip 1.0, no biases, tied embeddings.

The text is ``tinyshakespeare.txt`` from ``$GPTJAX_SHARED_DATA`` (default: ``../shared/data``
beside the repository); ``--data.source=text:PATH`` points elsewhere.

Hardware: 2 CPU cores, measured one after the other on the same quiet machine, data
preparation and compilation included (nanoGPT at commit 3adf61e, PyTorch 2.13 eager, its
prepare.py on the same file; gptjax with an empty GPTJAX_CACHE, so the tokenizer, the dataset
and the compiled programs were built too):

    nanoGPT  the command above: val loss 1.8857 at step 2000, 108.3 s wall (~47 ms/iteration)
    gptjax   val loss 1.8587 at step 2000, 97.3 s wall (37.9 ms/step, 20.3k tokens/s, 50 steps
             per compiled call; one step per call: 109.8 s, 45 ms/step)

nanoGPT multiplies in float32 on a CPU, as gptjax did then. This file now sets
`matmul_precision="auto"`: on a CPU with bfloat16 instructions (this one, an AMD EPYC with
AVX512-BF16) the weight matmuls take bfloat16 operands, summed in float32. Two runs one after
the other, on a later day:

    auto     val loss 1.8581 at step 2000, 86.7 s wall (28.7 ms/step, 26.8k tokens/s)
    float32  (`--model.matmul_precision=float32`) val loss 1.8587, 109.0 s wall (41.1 ms/step)
"""

import os
from pathlib import Path

from gptjax.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig


def shared_data_dir() -> Path:
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return Path(os.environ.get("GPTJAX_SHARED_DATA", default))


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            preset="shakespeare_char",
            num_layers=4,
            num_heads=4,
            embed_dim=128,
            max_len=64,
            dropout_rate=0.0,
            use_bias=False,
            tie_embeddings=True,
            matmul_precision="auto",  # bfloat16 operands where the CPU multiplies them natively
        ),
        data=DataConfig(
            source=f"text:{shared_data_dir() / 'tinyshakespeare.txt'}",
            tokenizer_type="char",
            val_fraction=0.1,
        ),
        train=TrainConfig(
            steps=2000,
            batch_size=12,
            learning_rate=1e-3,
            min_learning_rate=1e-4,
            warmup_steps=100,
            decay_steps=2000,
            weight_decay=0.1,
            beta1=0.9,
            beta2=0.99,
            grad_clip=1.0,
            log_every_steps=50,
            steps_per_call=50,  # 50 optimizer steps per compiled call: ~20% faster on CPU
        ),
        eval=EvalConfig(every_steps=250, num_batches=20, sample_prompt="ROMEO:", sample_tokens=200),
    )
