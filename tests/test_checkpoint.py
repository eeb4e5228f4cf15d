"""Checkpoints and fault tolerance, end to end: `python -m gptjax pretrain` runs that are stopped
(SIGTERM, SIGINT, SIGKILL at a random moment), corrupted, poisoned with NaNs, resumed onto other
meshes, pmap and two processes — each compared, loss by loss, with one uninterrupted run.

Training runs are real subprocesses sharing a persistent XLA compilation cache (a module temp
dir), so each layout compiles once; compilation otherwise dominates the file's time. Runs that
need no watching start together in the background right after the uninterrupted one, so both
cores stay busy while the signal tests run.
"""

import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptjax import checkpoint
from gptjax.__main__ import main
from gptjax.checkpoint import Checkpointer, load_params
from gptjax.config import CheckpointConfig
from gptjax.exports import export
from gptjax.inference.generator import load
from gptjax.training.steps import TrainState

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
TINY = [
    "pretrain",
    "--config",
    str(ROOT / "experiments" / "tiny.py"),
    f"--train.steps={STEPS}",
    "--train.log_every_steps=1",
    "--eval.sample_tokens=0",
    "--eval.every_steps=0",
    "--eval.num_batches=1",
    "--model.num_heads=4",  # so that mesh.tensor=4 divides the heads
    "--checkpoint.every_steps=10",
    "--checkpoint.max_to_keep=0",
]
FSDP8 = ["--mesh.data=1", "--mesh.fsdp=8"]


class Runs:
    """Starts `python -m gptjax` subprocesses (own session, logs in files) and reaps them."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []
        self.env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }

    def start(self, name: str, args: list[str], *, devices: int = 8) -> subprocess.Popen:
        out = open(self.tmp / f"{name}.out", "w")  # noqa: SIM115 (closed in finish)
        err = open(self.tmp / f"{name}.err", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "gptjax", *args],
            cwd=ROOT,
            env={**self.env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        proc.name, proc.files = name, (out, err)
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 240) -> dict:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for f in proc.files:
            f.close()
        read = lambda suffix: (self.tmp / f"{proc.name}{suffix}").read_text()  # noqa: E731
        return {"rc": proc.returncode, "stdout": read(".out"), "stderr": read(".err")}

    def run(self, name: str, args: list[str], *, devices: int = 8) -> dict:
        result = self.finish(self.start(name, args, devices=devices))
        assert result["rc"] == 0, result["stderr"][-3000:]
        return result

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    launcher = Runs(tmp_path_factory.mktemp("ckpt_runs"))
    yield launcher
    launcher.kill_all()


@pytest.fixture(scope="module")
def baseline(runs):
    """The uninterrupted run under fsdp=8: its workdir (checkpoints every 5 steps, all kept)
    and its loss at every step."""
    work = runs.tmp / "baseline"
    runs.run("baseline", [*TINY, *FSDP8, "--workdir", str(work)])
    losses = _losses(work)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return work, losses


LAYOUTS = {  # name: (overrides, devices)
    "data2-tensor4": (["--mesh.data=2", "--mesh.tensor=4"], 8),
    "one-device": (["--mesh.data=1"], 1),
    "pmap": (["--train.parallelism=pmap"], 8),
}


@pytest.fixture(scope="module")
def background(runs, baseline):
    """Starts the runs that need no watching: ``{name: (process, workdir)}``."""
    base_dir, _ = baseline
    started = {}
    for name, (args, devices) in LAYOUTS.items():
        work = _copy(base_dir, runs.tmp / name, 30)
        started[name] = runs.start(name, [*TINY, *args, "--workdir", str(work)], devices=devices)
    work = _copy(base_dir, runs.tmp / "nan", 10)
    nan = ["--train.learning_rate=1e9", "--checkpoint.every_steps=1"]
    started["nan"] = runs.start("nan", [*TINY, *FSDP8, "--workdir", str(work), *nan])
    work = _copy(base_dir, runs.tmp / "damaged", STEPS)
    _damage(work, STEPS, "truncated")
    _damage(work, STEPS - 10, "deleted")
    started["damaged"] = runs.start("damaged", [*TINY, *FSDP8, "--workdir", str(work)])
    return started


def _losses(workdir: Path, skip: int = 0) -> dict[int, float]:
    """``{step: train_loss}`` of the metrics records after the first ``skip`` lines."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()[skip:]
    records = [json.loads(line) for line in lines if '"train_loss"' in line]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train_loss"] for r in records}


def _lines(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _copy(baseline_dir: Path, dest: Path, upto: int) -> Path:
    """A workdir holding the baseline's checkpoints up to step ``upto`` (a run that stopped)."""
    (dest / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(baseline_dir / name, dest / name)
    for step_dir in (baseline_dir / "checkpoints").iterdir():
        if int(step_dir.name) <= upto:
            shutil.copytree(step_dir, dest / "checkpoints" / step_dir.name)
    return dest


def _wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(f'"step": {s},' in t for t in _tail(workdir) for s in range(step, STEPS + 1)):
            return
        time.sleep(0.02)
    raise AssertionError(f"{proc.name} never logged step {step} (exit code {proc.poll()})")


def _tail(workdir: Path) -> list[str]:
    path = workdir / "metrics.jsonl"
    return path.read_text().splitlines()[-3:] if path.exists() else []


def _assert_continues(baseline_losses, resumed: dict[int, float], first: int, last: int, rtol=0):
    assert sorted(resumed) == list(range(first, last + 1)), sorted(resumed)
    got = np.array([resumed[s] for s in range(first, last + 1)])
    want = np.array([baseline_losses[s] for s in range(first, last + 1)])
    if rtol == 0:  # same layout, same compiled program: bit-identical on CPU
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=rtol)


def _data_position(workdir: Path, step: int) -> int:
    reader = Checkpointer(workdir, read_only=True)
    args = ocp.args.Composite(data=ocp.args.JsonRestore())
    return reader.manager.restore(step, args=args).data["next_index"]


# ----------------------------------------------------------------------------- stop and resume


def _stop(runs, name: str, work: Path, after: int, sig: signal.Signals) -> tuple[int, str]:
    """Runs the baseline's command in ``work``, sends ``sig`` once step ``after`` is logged,
    checks the clean stop; returns the step it stopped at and its stdout."""
    proc = runs.start(name, [*TINY, *FSDP8, "--workdir", str(work)])
    _wait_for_step(work, after, proc)
    proc.send_signal(sig)
    result = runs.finish(proc)
    assert result["rc"] == 0, result["stderr"][-3000:]
    stopped = [x for x in result["stdout"].splitlines() if f"stopped by {sig.name}" in x]
    assert len(stopped) == 1, result["stdout"]
    n = int(stopped[0].split("after step ")[1].split(":")[0])
    assert after <= n < STEPS and f"checkpoints/{n} saved" in stopped[0], stopped[0]
    assert Checkpointer(work, read_only=True).latest_step() == n
    assert _data_position(work, n) == n  # the data iterator is exactly n batches in
    return n, result["stdout"]


@pytest.mark.usefixtures("background")
def test_sigterm_then_sigint_stop_cleanly_and_resume_the_same_run(runs, baseline):
    """Stopped by SIGTERM at n, resumed, stopped by Ctrl-C at m: steps n+1..m are bit for bit
    the uninterrupted run's."""
    _, base = baseline
    work = runs.tmp / "signals"
    n, _ = _stop(runs, "sigterm", work, 20, signal.SIGTERM)
    skip = _lines(work)
    m, stdout = _stop(runs, "sigint", work, min(n + 10, STEPS - 5), signal.SIGINT)
    assert f"resumed from {work / 'checkpoints' / str(n)} at step {n}\n" in stdout
    _assert_continues(base, _losses(work, skip), n + 1, m)


def test_stop_signals_ask_once_then_quit_and_restore_the_handlers():
    from gptjax.training.loop import _StopSignals

    before = [signal.getsignal(s) for s in _StopSignals.SIGNALS]
    with pytest.raises(KeyboardInterrupt), _StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread
        assert stop.agreed(step=7, every=1) == "SIGTERM"  # asked to stop: no exception
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on top: stop now
        time.sleep(1)
    assert [signal.getsignal(s) for s in _StopSignals.SIGNALS] == before


@pytest.mark.usefixtures("background")
def test_sigkill_at_a_random_moment_resumes_from_the_last_complete_checkpoint(runs, baseline):
    """Killed at a seeded random moment, resumed: every step is in metrics.jsonl exactly once
    (the killed run's records after its last checkpoint are gone) and every loss is the
    uninterrupted run's. GPTJAX_TEST_SEED=N repeats a moment."""
    _, base = baseline
    seed = int(os.environ.get("GPTJAX_TEST_SEED", "20261201"))
    rng = random.Random(seed)
    kill_after, delay = rng.randint(4, 45), rng.uniform(0.0, 0.1)
    why = f"GPTJAX_TEST_SEED={seed}: SIGKILL {delay:.3f}s after step {kill_after}"
    print(why)
    work = runs.tmp / "sigkill"
    proc = runs.start("sigkill", [*TINY, *FSDP8, "--workdir", str(work)])
    _wait_for_step(work, kill_after, proc)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    runs.finish(proc)
    last = Checkpointer(work, read_only=True).latest_step() or 0
    if last:  # the latest step that looks complete is complete
        load_params(work, _abstract_params(work), last)
    resumed = runs.run("sigkill-resume", [*TINY, *FSDP8, "--workdir", str(work)])
    if last:
        assert f"at step {last}\n" in resumed["stdout"], (why, resumed["stdout"])
    assert not list((work / "checkpoints").glob("*.orbax-checkpoint-tmp*")), why
    _assert_continues(base, _losses(work), 1, STEPS)


def test_unfinished_save_is_never_listed_and_is_cleaned_up(baseline, tmp_path):
    base_dir, _ = baseline
    work = _copy(base_dir, tmp_path / "w", 30)
    # The worst case of a kill mid-save: every file written, the final rename not yet done.
    tmp = work / "checkpoints" / "40.orbax-checkpoint-tmp"
    shutil.copytree(base_dir / "checkpoints" / "40", tmp)
    assert Checkpointer(work, read_only=True).latest_step() == 30
    Checkpointer(work).close()  # what a resumed run opens: it deletes the leftover...
    deadline = time.monotonic() + 10
    while tmp.exists() and time.monotonic() < deadline:  # ...in a background thread
        time.sleep(0.05)
    assert not tmp.exists()


# ----------------------------------------------------------------------------- other layouts


@pytest.mark.parametrize("name", LAYOUTS)
def test_fsdp8_checkpoint_continues_on_another_layout(runs, baseline, background, name):
    base_dir, base = baseline
    result = runs.finish(background[name])
    assert result["rc"] == 0, result["stderr"][-3000:]
    work = runs.tmp / name
    assert f"resumed from {work / 'checkpoints' / '30'} at step 30" in result["stdout"]
    _assert_continues(base, _losses(work), 31, STEPS, rtol=1e-5)
    # What this layout saved (pmap: one replica) restores like the fsdp=8 run's own state.
    abstract = _abstract_params(work)
    mine, theirs = load_params(work, abstract, STEPS), load_params(base_dir, abstract, STEPS)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # Adam: ~0 grads


def test_two_processes_restore_and_stop_together(runs, baseline, tmp_path):
    """2 processes × 4 devices resume the 1 × 8 checkpoint; a SIGTERM to process 1 alone stops
    both at the same step with one checkpoint."""
    base_dir, base = baseline
    work = _copy(base_dir, tmp_path / "two", 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        runs.start(
            f"two.p{i}",
            [
                *TINY,
                *FSDP8,
                "--workdir",
                str(work),
                "--dist.num_processes=2",
                f"--dist.process_id={i}",
                f"--dist.coordinator_address=127.0.0.1:{port}",
            ],
            devices=4,
        )
        for i in range(2)
    ]
    _wait_for_step(work, 13, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    results = [runs.finish(p) for p in procs]
    assert [r["rc"] for r in results] == [0, 0], results[1]["stderr"][-3000:]
    line = next(x for x in results[0]["stdout"].splitlines() if "stopped by SIGTERM" in x)
    n = int(line.split("after step ")[1].split(":")[0])
    assert Checkpointer(work, read_only=True).latest_step() == n
    _assert_continues(base, _losses(work), 11, n, rtol=1e-5)


def _abstract_params(workdir: Path):
    from flax import linen as nn

    from gptjax.model import abstract_params
    from gptjax.workdir import read_config as load_workdir_config

    return nn.meta.unbox(abstract_params(load_workdir_config(workdir).model))["params"]


# ----------------------------------------------------------------------------- damage


def _damage(workdir: Path, step: int, how: str) -> None:
    files = [f for f in (workdir / "checkpoints" / str(step) / "params").rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    if how == "truncated":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        biggest.unlink()


def test_damaged_checkpoint_is_named_and_fallback_uses_the_previous_good_one(
    runs, baseline, background
):
    """Step 60 has a truncated array file, step 50 a deleted one."""
    _, base = baseline
    work = runs.tmp / "damaged"
    result = runs.finish(background["damaged"])
    assert result["rc"] == 2 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
    line = result["stderr"].strip().splitlines()[-1]
    assert f"error: checkpoint step {STEPS} in {work / 'checkpoints'} is unreadable (" in line
    assert "OUT_OF_RANGE" in line and "--checkpoint.fallback=true" in line, line
    assert f"previous checkpoint (step {STEPS - 10})" in line
    args = [*TINY, *FSDP8, "--workdir", str(work), "--checkpoint.fallback=true"]
    result = runs.run("fallback", args)
    moved = [x for x in result["stdout"].splitlines() if "is unreadable" in x]
    assert len(moved) == 2 and f"checkpoints/{STEPS - 10} is unreadable" in moved[1], moved
    assert f"at step {STEPS - 20}\n" in result["stdout"]
    for step in (STEPS, STEPS - 10):
        assert (work / checkpoint.UNREADABLE_DIR / str(step)).is_dir()
    _assert_continues(base, _losses(work), STEPS - 19, STEPS)
    assert Checkpointer(work, read_only=True).steps()[-3:] == [40, 50, 60]  # written again
    load_params(work, _abstract_params(work))


ABANDONED_READS = """
import gc, sys, types
from gptjax import checkpoint


@types.coroutine
def _pending():
    yield


def _read(name):
    async def read():  # as orbax's shard reader: every BaseException becomes an Exception
        try:
            await _pending()
        except BaseException as e:
            raise Exception(f"Encountered error while reading array index ({name})") from e

    coroutine = read()
    coroutine.__qualname__ = name
    coroutine.send(None)  # suspended at its await, as a read abandoned mid-way
    return coroutine


reads = [_read("_read_array_index_and_device_put"), _read("someone_else")]
try:
    with checkpoint._reading():
        raise Exception("Encountered error while reading array index") from ValueError("DATA_LOSS")
except checkpoint.UnreadableCheckpoint:
    print("unreadable")
del reads
gc.collect()
"""


def test_abandoned_orbax_shard_reads_print_nothing_after_the_one_line():
    """Closing an abandoned orbax shard read raises (orbax turns GeneratorExit into Exception);
    after a read error that noise is dropped, and every other unraisable still prints."""
    result = subprocess.run(
        [sys.executable, "-c", ABANDONED_READS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout == "unreadable\n", result.stderr
    assert "(someone_else)" in result.stderr, result.stderr
    assert "_read_array_index_and_device_put" not in result.stderr, result.stderr


def test_nan_stops_the_run_and_every_checkpoint_is_finite(runs, background):
    work = runs.tmp / "nan"
    result = runs.finish(background["nan"])
    assert result["rc"] == 2, result["stderr"][-3000:]
    line = result["stderr"].strip().splitlines()[-1]
    assert line.startswith("gptjax: error: ") and "Traceback" not in result["stderr"], line
    bad = int(re.search(r"(?:at|after) step (\d+);", line).group(1))
    saved = Checkpointer(work, read_only=True).steps()
    assert max(saved) == bad - 1 and f"checkpoint is {work / 'checkpoints'}/{bad - 1})" in line
    abstract = _abstract_params(work)
    for step in saved:
        params = load_params(work, abstract, step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


def test_changing_what_the_checkpoint_fixes_is_refused(baseline, tmp_path, capsys):
    base_dir, _ = baseline
    work = _copy(base_dir, tmp_path / "w", 30)
    config_before = (work / "config.json").read_text()
    for extra in (
        ["--model.embed_dim=128"],
        ["--model.embed_dim=128", "--checkpoint.allow_reshape=true"],
    ):
        assert main([*TINY, *FSDP8, "--workdir", str(work), *extra]) == 2
        err = capsys.readouterr().err
        assert "different model shape (model.embed_dim: 64 → 128)" in err, err
        assert "allow_reshape" not in err  # no reshape can make 64 wide arrays 128 wide
    assert main([*TINY, *FSDP8, "--workdir", str(work), "--train.batch_size=32"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 16 → 32" in err and "--checkpoint.allow_reshape=true" in err, err
    assert (work / "config.json").read_text() == config_before  # a refused run writes nothing


def test_allow_reshape_lets_a_new_batch_size_continue_at_the_same_sample():
    from gptjax.config import Config, replace

    saved, tokenizer = Config(), _tokenizer()
    bigger = replace(saved, {"train.batch_size": 64})
    with pytest.raises(ValueError, match="train.batch_size: 32 → 64"):
        checkpoint.check_compatible(saved, tokenizer, bigger, tokenizer, "w/checkpoints/10")
    allowed = replace(bigger, {"checkpoint.allow_reshape": True})
    checkpoint.check_compatible(saved, tokenizer, allowed, tokenizer, "w/checkpoints/10")
    said = []
    position = checkpoint._rebatch({"next_index": 10}, saved, allowed, said.append)
    assert position == {"next_index": 5} and "global batch 5" in said[0]  # 320 samples in


# ----------------------------------------------------------------------------- export, policy


def test_export_generates_what_the_checkpoint_generates(baseline, tmp_path, monkeypatch):
    base_dir, _ = baseline

    def no_pickles(*args, **kwargs):
        raise AssertionError("checkpoint loading unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickles)
    out = tmp_path / "export"
    written = export(base_dir, out)
    assert written == out / "checkpoints" / str(STEPS)
    assert not (written / "train").exists()  # no optimizer state
    prompt = dict(max_new_tokens=20, temperature=0.8, seed=3)
    assert load(out)("ROMEO:", **prompt) == load(base_dir)("ROMEO:", **prompt)
    half = export(base_dir, tmp_path / "bf16", dtype="bfloat16")
    metadata = Checkpointer(half.parent.parent, read_only=True).manager.item_metadata(STEPS)
    assert {m.dtype for m in jax.tree.leaves(metadata["params"].tree)} == {np.dtype(jnp.bfloat16)}
    abstract = _abstract_params(base_dir)
    full, rounded = load_params(base_dir, abstract), load_params(half.parent.parent, abstract)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(rounded), strict=True):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(b, a.astype(jnp.bfloat16).astype(np.float32))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        export(base_dir, out)


def test_keep_best_and_max_to_keep(tmp_path):
    policy = CheckpointConfig(max_to_keep=2, keep_best=True, async_save=False)
    val = {2: 0.5, 4: 0.9, 6: 0.7, 7: 0.8}  # the lowest val_loss is at step 2
    for steps, kept in [(range(1, 7), [2, 5, 6]), (range(7, 8), [2, 6, 7])]:
        ckpt = Checkpointer(tmp_path, policy)  # reopened: the best is remembered
        for step in steps:
            state = TrainState(
                step=jnp.int32(step),
                params={"w": jnp.full((4,), float(step))},
                opt_state=(),
                rng=jax.random.PRNGKey(0),
            )
            ckpt.save(
                state,
                data_state={},
                config=_config(),
                tokenizer=_tokenizer(),
                val_loss=val.get(step),
            )
        ckpt.close()
        assert Checkpointer(tmp_path, read_only=True).steps() == kept


def _config():
    from gptjax.config import Config

    return Config()


def _tokenizer():
    from gptjax.tokenizer import Tokenizer

    return Tokenizer.train(["to be or not to be"] * 20, model_type="char", progress=False)


def test_export_cli_then_generate(baseline, tmp_path):
    base_dir, _ = baseline
    out = tmp_path / "exported"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cli = [sys.executable, "-m", "gptjax"]
    r = subprocess.run(
        [*cli, "export", "--workdir", str(base_dir), "--out", str(out), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert f"exported {out / 'checkpoints' / str(STEPS)}" in r.stdout
    g = subprocess.run(
        [*cli, "generate", "--workdir", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "10"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert g.returncode == 0 and g.stdout.startswith("ROMEO:"), g.stderr


def test_metrics_of_steps_after_the_restored_checkpoint_are_dropped(tmp_path):
    """A run killed after step 37 with its last checkpoint at 30: resuming at 30 keeps the
    records up to 30 and nothing of 31-37; resuming at step 0 keeps nothing."""
    from gptjax.metrics import MetricsWriter, read_metrics

    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 38):
            writer.write(step, train_loss=1.0 / step)
        writer.write(30, val_loss=0.5)
    with MetricsWriter(tmp_path, resume_step=30) as writer:
        writer.write(31, train_loss=9.0)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [*range(1, 31), 30, 31]
    assert records[-1]["train_loss"] == 9.0
    with MetricsWriter(tmp_path, resume_step=0) as writer:
        writer.write(1, train_loss=3.0)
    assert read_metrics(tmp_path) == [{"step": 1, "train_loss": 3.0}]
