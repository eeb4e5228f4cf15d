"""The public package surface: `import gptjax` is light, every public name resolves, and no
public name shadows a submodule."""

import importlib.util
import subprocess
import sys

import gptjax

HEAVY = ("jax", "flax", "optax", "orbax", "tensorflow_datasets", "grain", "sentencepiece")


def test_import_gptjax_loads_none_of_the_training_stack():
    code = "import sys, gptjax; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert heavy == [], heavy
    assert "gptjax.training" not in loaded and "gptjax.checkpoint" not in loaded


def test_every_public_name_resolves_and_shadows_no_submodule():
    assert sorted(gptjax.__all__) == sorted(set(gptjax.__all__))
    for name in gptjax.__all__:
        assert getattr(gptjax, name) is not None, name
        assert importlib.util.find_spec(f"gptjax.{name}") is None, f"gptjax.{name} is a module"
    assert gptjax.pretrain.__module__ == "gptjax.training.pretrain"
    assert issubclass(gptjax.GptjaxError, ValueError)
    for old in ("train", "GPTConfig", "restore_params"):
        assert not hasattr(gptjax, old), old
