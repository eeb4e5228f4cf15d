"""Multi-process training on one machine, with real processes: `python -m gptjax pretrain` as 2
processes × 4 CPU devices (jax.distributed on a 127.0.0.1 coordinator, gloo collectives) logs the
same loss at every step as 1 process × 8 devices and as 1 device; each process reads its own half
of every global batch; a config mismatch or a missing process ends every process with one line;
SLURM auto-detection joins processes and a workdir that is not shared is caught.

The training runs (7 processes, ~150 CPU-seconds, mostly XLA compiles and imports) all start at
once in a module fixture, so the cores stay busy while processes wait for their peers.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gptjax import distributed
from gptjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
TINY = [
    "pretrain",
    "--config",
    str(ROOT / "experiments" / "tiny.py"),
    f"--train.steps={STEPS}",
    "--train.log_every_steps=1",
    "--eval.sample_tokens=0",
    "--eval.num_batches=1",
]
MESH_222 = ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]

# Runs `python -m gptjax ARGS...` and saves the `inputs` of every train batch this process read
# (a spy around data.train_batches, which the loop calls) — how each process's share is proven.
SPY = textwrap.dedent(
    """
    import atexit, runpy, sys
    import numpy as np
    from gptjax.data import pipeline as data

    out, sys.argv = sys.argv[1], ["gptjax", *sys.argv[2:]]
    seen, real = [], data.train_batches

    class Spy:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            batch = next(self.it)
            seen.append(batch["inputs"])
            return batch

        def __getattr__(self, name):
            return getattr(self.it, name)

    data.train_batches = lambda *a, **k: Spy(real(*a, **k))
    atexit.register(lambda: seen and np.save(out, np.stack(seen)))
    runpy.run_module("gptjax", run_name="__main__", alter_sys=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Starts processes in their own sessions and kills whatever is left at the end."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []
        (tmp / "spy.py").write_text(SPY)

    def start(self, name: str, args: list[str], *, devices: int, env=None, script=None):
        """``python -m gptjax ARGS`` under the spy, or ``python SCRIPT ARGS``."""
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 (closed in finish)
        spy = [str(self.tmp / "spy.py"), str(self.tmp / f"{name}.npy")]
        proc = subprocess.Popen(
            [sys.executable, *([str(script)] if script else spy), *args],
            cwd=self.tmp,
            env={
                **os.environ,
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                **(env or {}),
            },
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        proc.name, proc.log, proc.t0 = name, log, time.monotonic()
        self.procs.append(proc)
        return proc

    def start_group(self, name: str, args: list[str], *, n: int = 2, env_of=None, extra_of=None):
        """``n`` processes × 4 devices joined through a fresh 127.0.0.1 port."""
        port = _free_port()
        return [
            self.start(
                f"{name}.p{i}",
                [
                    *args,
                    f"--dist.num_processes={n}",
                    f"--dist.process_id={i}",
                    f"--dist.coordinator_address=127.0.0.1:{port}",
                    *(extra_of(i) if extra_of else []),
                ],
                devices=4,
                env=env_of(i) if env_of else None,
            )
            for i in range(n)
        ]

    def finish(self, proc, timeout: float = 240) -> dict:
        try:
            stdout, _ = proc.communicate(timeout=max(1.0, proc.t0 + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill(proc)
            stdout, _ = proc.communicate()
        proc.log.close()
        npy = self.tmp / f"{proc.name}.npy"
        return {
            "rc": proc.returncode,
            "stdout": stdout,
            "stderr": (self.tmp / f"{proc.name}.log").read_text(),
            "seconds": time.monotonic() - proc.t0,
            "inputs": np.load(npy) if npy.exists() else None,
        }

    def kill(self, proc) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        for proc in self.procs:
            self.kill(proc)
            if not proc.log.closed:
                proc.log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every training run of this module, started at once; ``{name: result or [results]}``."""
    tmp = tmp_path_factory.mktemp("multihost")
    from gptjax.config import load_experiment
    from gptjax.data import pipeline as data

    data.load_corpus(load_experiment(str(ROOT / "experiments" / "tiny.py")).data, log=lambda _: 0)
    launch = Launcher(tmp)
    work = {name: str(tmp / name) for name in ("one", "jit8", "pmap8", "multi222", "multid8")}
    try:
        started = {
            "one": launch.start("one", [*TINY, "--workdir", work["one"]], devices=1),
            "jit8": launch.start("jit8", [*TINY, "--workdir", work["jit8"], *MESH_222], devices=8),
            "pmap8": launch.start(
                "pmap8",
                [*TINY, "--workdir", work["pmap8"], "--train.parallelism=pmap"],
                devices=8,
            ),
            # Separate caches, as on separate hosts: each process trains its own tokenizer.
            "multi222": launch.start_group(
                "multi222",
                [*TINY, "--workdir", work["multi222"], *MESH_222],
                env_of=lambda i: {"GPTJAX_CACHE": str(tmp / f"cache{i}")},
            ),
            "multid8": launch.start_group(
                "multid8", [*TINY, "--workdir", work["multid8"], "--mesh.data=8"]
            ),
        }
        results = {
            name: [launch.finish(p) for p in procs]
            if isinstance(procs, list)
            else launch.finish(procs)
            for name, procs in started.items()
        }
    finally:
        launch.kill_all()
    for name, result in results.items():
        for r in result if isinstance(result, list) else [result]:
            r["workdir"] = work[name]
    return results


def _ok(result) -> None:
    for r in result if isinstance(result, list) else [result]:
        assert r["rc"] == 0, r["stderr"][-3000:]


def _losses(workdir: str) -> np.ndarray:
    records = [r for r in read_metrics(workdir) if "train_loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "one record per step"
    return np.array([r["train_loss"] for r in records])


def test_sharded_and_pmap_match_one_device(runs):
    """The issue's 'done when': mesh 2,2,2 and pmap on 8 devices log one device's losses."""
    for name in ("one", "jit8", "pmap8"):
        _ok(runs[name])
    ref = _losses(runs["one"]["workdir"])
    assert ref[-1] < ref[0] - 0.5, ref
    for name in ("jit8", "pmap8"):
        np.testing.assert_allclose(_losses(runs[name]["workdir"]), ref, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("name, same_mesh", [("multi222", "jit8"), ("multid8", "one")])
def test_two_processes_match_one_process(runs, name, same_mesh):
    _ok(runs[name])
    losses = _losses(runs[name][0]["workdir"])
    np.testing.assert_allclose(losses, _losses(runs[same_mesh]["workdir"]), rtol=1e-4)
    np.testing.assert_allclose(losses, _losses(runs["one"]["workdir"]), rtol=1e-4)


@pytest.mark.parametrize("name", ["multi222", "multid8"])
def test_each_process_reads_its_own_half(runs, name):
    _ok(runs[name])
    full = runs["one"]["inputs"]  # [steps, 16, T]: the global batches of the 1-process run
    halves = [r["inputs"] for r in runs[name]]
    assert full.shape == (STEPS, 16, 64) and all(h.shape == (STEPS, 8, 64) for h in halves)
    np.testing.assert_array_equal(halves[0], full[:, :8])
    np.testing.assert_array_equal(halves[1], full[:, 8:])
    for step in range(STEPS):  # disjoint windows, not merely different orders
        rows = [{h[step, r].tobytes() for r in range(8)} for h in halves]
        assert not rows[0] & rows[1]


def test_only_process_zero_writes_and_checkpoints_are_shared(runs):
    p0, p1 = runs["multi222"]
    _ok([p0, p1])
    assert "model:" in p0["stdout"] and "step 20: val_loss" in p0["stdout"]
    # The loop logs nothing on process 1 (the CLI's closing "done:" summary and gloo's own
    # connection notices aside). Gloo writes its notices from C++ threads, so one may arrive
    # split across lines ("[Gloo] Rank " on one, "1 is connected to 1 peer ranks..." on the next,
    # or the rank alone on a line of its own, or a blank line: each seen in a suite run).
    lines = [ln.strip() for ln in p1["stdout"].splitlines()]
    gloo = ("[Gloo]", "peer ranks")
    ours = [
        ln
        for ln in lines
        if ln and not ln.isdigit() and not ln.startswith("done:") and not any(g in ln for g in gloo)
    ]
    assert ours == []
    for marker in ("model:", "val_loss", "pretrain:"):  # our log lines and progress bar
        assert marker not in p1["stdout"] + p1["stderr"], marker
    workdir = Path(p0["workdir"])
    assert (workdir / "config.json").is_file() and (workdir / "tokenizer.model").is_file()
    # Orbax wrote one multi-process checkpoint at the end, finalised by process 0.
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()


def _pair(tmp_path, *, extra_of=None, timeout=120):
    launch = Launcher(tmp_path)
    try:
        args = [*TINY, "--workdir", str(tmp_path / "w")]
        procs = launch.start_group("pair", args, extra_of=extra_of)
        return [launch.finish(p, timeout) for p in procs]
    finally:
        launch.kill_all()


def test_version_mismatch_is_named_per_process():
    """What every process raises when the gathered ``versions()`` differ (the end-to-end path,
    gather then compare, is the config mismatch test below)."""
    mine = distributed.versions()
    other = mine.replace("gptjax ", "gptjax 9.9.9-", 1)
    distributed.check_same_versions([mine, mine])  # equal: no error
    with pytest.raises(ValueError, match="the 2 processes disagree on package versions") as info:
        distributed.check_same_versions([mine, other])
    line = str(info.value)
    assert f"process 0: {mine}; process 1: {other}" in line and "\n" not in line
    assert "install the same gptjax" in line


def test_config_mismatch_names_only_the_differing_keys():
    keys = ["train.steps", "train.learning_rate"]
    distributed.check_same_config(keys, [["20", "0.003"], ["20", "0.003"]])
    with pytest.raises(ValueError, match="disagree on config train.learning_rate") as info:
        distributed.check_same_config(keys, [["20", "0.003"], ["20", "0.002"]])
    assert "process 0: 0.003; process 1: 0.002" in str(info.value)
    assert "train.steps" not in str(info.value)


def test_config_mismatch_stops_every_process(tmp_path):
    results = _pair(tmp_path, extra_of=lambda i: ["--train.learning_rate=0.002"] if i else [])
    for r in results:
        assert r["rc"] == 2, r["stderr"][-2000:]
        line = r["stderr"].strip().splitlines()[-1]
        assert line.startswith("gptjax: error: the 2 processes disagree on config ")
        assert "config train.learning_rate (process 0: 0.003; process 1: 0.002)" in line
        assert "config train.steps" not in line


def test_an_unshared_workdir_stops_every_process(tmp_path):
    """Each process is given its own folder (as on hosts without a shared filesystem): the run
    stops before training instead of hanging at the first checkpoint."""
    results = _pair(tmp_path, extra_of=lambda i: ["--workdir", str(tmp_path / "w1")] if i else [])
    for r in results:
        assert r["rc"] == 2, r["stderr"][-2000:]
        line = r["stderr"].strip().splitlines()[-1]
        assert line.startswith("gptjax: error: --workdir ") and "is not shared" in line, line
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize(
    "process_id, message",
    [
        (1, r"process 1 could not join the coordinator at dist.coordinator_address="),
        (0, r"process 0 waited 3s at dist.coordinator_address=.* processes \[1\] of 2 never"),
    ],
)
def test_a_missing_process_fails_in_bounded_time(tmp_path, process_id, message):
    launch = Launcher(tmp_path)
    try:
        proc = launch.start(
            "alone",
            [
                *TINY,
                "--workdir",
                str(tmp_path / "w"),
                "--dist.num_processes=2",
                f"--dist.process_id={process_id}",
                f"--dist.coordinator_address=127.0.0.1:{_free_port()}",
            ],
            devices=4,
            env={distributed.TIMEOUT_ENV: "3"},
        )
        r = launch.finish(proc, timeout=60)
    finally:
        launch.kill_all()
    assert r["rc"] == 2, r["stderr"][-2000:]
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax: error: "), r["stderr"][-2000:]
    assert "GPTJAX_DIST_TIMEOUT" in lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert r["seconds"] < 30  # 3 s of waiting plus start-up, not JAX's 5-minute default


SLURM_SCRIPT = """
import json, sys, jax
from gptjax import distributed
from gptjax.config import DistConfig

distributed.initialize(DistConfig(num_processes=0))  # JAX reads SLURM_* (set by the test)
result = {"index": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count()}
distributed.check_shared_workdir(sys.argv[1])
try:
    distributed.check_shared_workdir(sys.argv[2], wait_s=1)
except ValueError as e:
    result["unshared"] = str(e)
print(json.dumps(result))
"""


def test_slurm_auto_detection_and_the_shared_workdir_check(tmp_path):
    """dist.num_processes=0 under srun-like SLURM_* variables; a workdir that is not the same
    folder for every process (here: a different path each) stops every process."""
    (tmp_path / "slurm.py").write_text(SLURM_SCRIPT)
    launch, port = Launcher(tmp_path), _free_port()
    try:
        procs = [
            launch.start(
                f"slurm.p{i}",
                [str(tmp_path / "shared"), str(tmp_path / f"own{i}")],
                devices=2,
                script=tmp_path / "slurm.py",
                env={
                    "SLURM_JOB_ID": "4242",
                    "SLURM_STEP_NODELIST": "localhost",
                    "SLURM_NTASKS": "2",
                    "SLURM_PROCID": str(i),
                    "SLURM_LOCALID": str(i),
                    "JAX_COORDINATOR_PORT": str(port),
                },
            )
            for i in range(2)
        ]
        results = [launch.finish(p, timeout=90) for p in procs]
    finally:
        launch.kill_all()
    for i, r in enumerate(results):
        assert r["rc"] == 0, r["stderr"][-2000:]
        out = json.loads(r["stdout"].strip().splitlines()[-1])
        assert (out["index"], out["count"], out["devices"]) == (i, 2, 4)
        assert out["unshared"].startswith(f"--workdir {tmp_path / f'own{i}'} is not shared")
        assert "processes [1] do not see the file" in out["unshared"]
    assert list((tmp_path / "shared").iterdir()) == []  # the marker is cleaned up


@pytest.mark.parametrize(
    "dist, match",
    [
        (dict(num_processes=2, process_id=2, coordinator_address="h:1"), r"0 <= process_id <"),
        (dict(num_processes=-1), r"need num_processes >= 0"),
        (dict(num_processes=2, coordinator_address="no-port"), r"must be HOST:PORT"),
        (dict(num_processes=2, coordinator_address="h:99999"), r"must be HOST:PORT"),
    ],
)
def test_bad_dist_config(dist, match):
    from gptjax.config import DistConfig

    with pytest.raises(ValueError, match=match):
        distributed.initialize(DistConfig(**dist))


def test_timeout_env(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7")
    assert distributed.timeout_s() == 7
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="GPTJAX_DIST_TIMEOUT='soon' must be a whole number"):
        distributed.timeout_s()


def test_single_process_agrees_with_itself():
    from gptjax.config import Config

    distributed.check_processes_agree(Config())  # one process: nothing to compare, no error
    assert "jax 0." in distributed.versions()
    assert distributed.config_fingerprint(Config()) == distributed.config_fingerprint(
        Config.from_dict({**Config().to_dict(), "dist": {"process_id": 3, "num_processes": 4}})
    )
