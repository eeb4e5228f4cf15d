"""Local folders and ``gs://`` buckets behind one path type.

``path(p)`` is a ``pathlib.Path`` for a local path and an ``etils.epath.Path`` (the path type
Orbax uses; gcsfs underneath) for ``gs://BUCKET/...``; both have ``/``, ``exists``,
``is_file``, ``read_bytes``, ``write_text``, ``iterdir``, ... so the code that reads and writes
workdirs, exports, tokenizers and text data has one path for both. Orbax writes checkpoints to
either through tensorstore.

What object storage cannot do, and what gptjax does instead:

* no appends: ``metrics.jsonl`` and TensorBoard's event files are written to a local mirror and
  uploaded whole (``gptjax/metrics.py``); no atomic rename: ``write_atomic`` writes the object
  in one request (an object appears whole or not at all).
* no folders: ``mkdir`` is a no-op and a "folder" exists once an object is under it.
* no memory-mapping: a ``gs://`` data cache is a local mirror whose entries are fetched and
  published whole (``mirror``, ``fetch``, ``publish``).

The first use of a bucket in a process checks it with one listing request, so a missing bucket,
missing credentials or a missing permission is one clear error before any work starts, not a
wall of retries and tracebacks from the libraries underneath.

Against a GCS emulator (``fake-gcs-server``) set ``STORAGE_EMULATOR_HOST`` (gcsfs, Google's
clients) and ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore) to its address.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gptjax.errors import GptjaxError

SCHEMES = ("gs://",)
_INSTALL = "pip install 'gptjax[gcs]' (gcsfs)"


def is_remote(p: str | os.PathLike) -> bool:
    return str(p).startswith(SCHEMES)


def path(p: str | os.PathLike) -> Any:
    """``p`` as a path object: ``epath.Path`` for ``gs://...``, ``pathlib.Path`` otherwise
    (``~`` expanded). The first use of a bucket checks it (``check_bucket``)."""
    text = os.fspath(p)
    if text.startswith("gs:/") and not text.startswith("gs://"):
        raise GptjaxError(f"{text!r} is a mangled gs:// URI (a pathlib.Path of one?); pass a str")
    if not is_remote(text):
        return p if isinstance(p, Path) else Path(text).expanduser()
    _prepare_gcs()
    from etils import epath

    check_bucket(bucket_of(text))
    return p if isinstance(p, epath.Path) else epath.Path(text)


def absolute(p: str | os.PathLike) -> Any:
    """``path(p)`` made absolute; a ``gs://`` URI already is (and ``epath``'s ``absolute``
    would glue the local working directory in front of it)."""
    return path(p) if is_remote(p) else Path(p).expanduser().absolute()


def bucket_of(uri: str) -> str:
    bucket = uri[len("gs://") :].split("/", 1)[0]
    if not bucket:
        raise GptjaxError(f"{uri!r} names no bucket; write gs://BUCKET/PATH")
    return bucket


def write_atomic(target: Any, data: bytes) -> None:
    """Writes ``data`` to ``target`` so that a reader sees the old file or the new one, never a
    part: a temporary file and a rename locally; one upload on object storage."""
    target = path(target)
    if is_remote(target):
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def move(src: Any, dst: Any) -> None:
    """Moves a file or folder (copy and delete, object by object, on object storage)."""
    src, dst = path(src), path(dst)
    if not is_remote(src) and not is_remote(dst):
        shutil.move(src, dst)
        return
    if src.is_dir():
        for child in src.iterdir():
            move(child, dst / child.name)
        src.rmtree(missing_ok=True)
    else:
        dst.write_bytes(src.read_bytes())
        src.unlink()


def rmtree(p: Any) -> None:
    p = path(p)
    if is_remote(p):
        if p.exists():
            p.rmtree(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def files_under(root: Any) -> list[Any]:
    """The files under the folder ``root``, at any depth, skipping names that start with a dot
    (and everything under such folders)."""
    found = []
    for child in path(root).iterdir():
        if child.name.startswith("."):
            continue
        found.extend(files_under(child) if child.is_dir() else [child])
    return found


def upload_tree(local: Path, remote: Any) -> None:
    """Copies every file under the local folder ``local`` to the same place under ``remote``."""
    remote = path(remote)
    for root, _, files in os.walk(local):
        for name in files:
            source = Path(root) / name
            (remote / str(source.relative_to(local))).write_bytes(source.read_bytes())


# ----------------------------------------------------------------------------- a shared cache

COMPLETE = ".complete"  # beside an entry of a bucket cache: written once the entry is whole
_MIRRORS: dict[Path, str] = {}  # local folder → the gs:// folder it mirrors


def cache_home() -> str:
    """gptjax's cache folder, as given: ``$GPTJAX_CACHE``, else ``~/.cache/gptjax`` (prepared
    datasets and tokenizers, bucket mirrors, compiled programs)."""
    return os.environ.get("GPTJAX_CACHE") or "~/.cache/gptjax"


def mirror(uri: str) -> Path:
    """A local folder standing for the ``gs://`` folder ``uri``, a cache shared by every host
    and run: the code reads and writes entries locally (memory-mapped datasets, token arrays),
    ``fetch`` downloads an entry that another host built, ``publish`` uploads one built here.
    The local copy lives under ``$GPTJAX_CACHE`` (default ``~/.cache/gptjax``) in ``gs/``."""
    path(uri)  # checks the bucket
    base = Path(cache_home()).expanduser()
    local = base / "gs" / uri[len("gs://") :].strip("/")
    _MIRRORS[local] = uri.rstrip("/")
    return local


def _remote_of(local: Path) -> Any:
    for root, uri in _MIRRORS.items():
        if local == root or root in local.parents:
            return path(f"{uri}/{local.relative_to(root).as_posix()}")
    return None


def _marker(remote: Any) -> Any:
    return remote.parent / f"{remote.name}{COMPLETE}"


def fetch(local: Path) -> bool:
    """Whether the cache entry ``local`` (a file or a folder) is here, after downloading it
    when it is a mirrored entry that is complete in the bucket and not here yet."""
    remote = _remote_of(local)
    if remote is None or local.exists() or not _marker(remote).exists():
        return local.exists()
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        if remote.is_dir():
            for source in files_under(remote):
                target = tmp / "entry" / os.fspath(source)[len(os.fspath(remote)) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
        else:
            (tmp / "entry").write_bytes(remote.read_bytes())
        os.replace(tmp / "entry", local)  # whole or not at all, as a local build
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def publish(local: Path) -> None:
    """Uploads the cache entry ``local`` to the bucket it mirrors, unless it is there already
    (the marker, written last, says so). A no-op for an entry of a local cache."""
    remote = _remote_of(local)
    if remote is None or _marker(remote).exists():
        return
    if local.is_dir():
        upload_tree(local, remote)
    else:
        remote.write_bytes(local.read_bytes())
    _marker(remote).write_text("complete\n")


@functools.cache
def _prepare_gcs() -> None:
    # gcsfs >= 2026.3 asks a gRPC storage-layout API before every open and rename unless this
    # is "false": 60 s per call where that API is unreachable (an emulator; no route to it).
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # Orbax reads paths through etils.epath; with TensorFlow installed it would pick tf.io.gfile,
    # which knows nothing of STORAGE_EMULATOR_HOST. gcsfs serves both cases.
    os.environ.setdefault("EPATH_USE_TF", "false")
    try:
        import fsspec
        import gcsfs  # noqa: F401
        from google.cloud import storage  # noqa: F401
    except ImportError:
        raise GptjaxError(f"gs:// paths need gcsfs and google-cloud-storage: {_INSTALL}") from None
    # fsspec caches folder listings per process for ever: Orbax would not see the checkpoints
    # that another process (or an earlier run) wrote after the first listing.
    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


@functools.cache
def check_bucket(bucket: str, timeout_s: float = 20.0) -> None:
    """Lists one object of ``bucket`` (the permission Orbax needs to find checkpoints) and
    raises one ``GptjaxError`` line naming the bucket and the fix if that fails."""
    _prepare_gcs()
    import google.auth.exceptions
    import requests
    from google.api_core import exceptions as api
    from google.cloud import storage

    where = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    try:
        client = storage.Client()  # anonymous under STORAGE_EMULATOR_HOST
        blobs = client.list_blobs(bucket, max_results=1, timeout=timeout_s, retry=None)
        next(iter(blobs), None)
    except google.auth.exceptions.DefaultCredentialsError:
        raise GptjaxError(
            f"gs://{bucket}: no Google Cloud credentials found; run `gcloud auth "
            f"application-default login` (a TPU VM has them from its service account) or set "
            f"GOOGLE_APPLICATION_CREDENTIALS to a key file"
        ) from None
    except api.NotFound:
        raise GptjaxError(
            f"bucket gs://{bucket} does not exist ({where}); create it (`gcloud storage buckets "
            f"create gs://{bucket} --location=REGION`, the region of your TPUs) or fix the name"
        ) from None
    except (api.Forbidden, api.Unauthorized) as e:
        raise GptjaxError(
            f"no permission to list gs://{bucket} (HTTP {e.code}); grant this account "
            f"roles/storage.objectAdmin on the bucket (`gcloud storage buckets "
            f"add-iam-policy-binding gs://{bucket} --member=... --role=roles/storage.objectAdmin`)"
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise GptjaxError(
            f"cannot reach Google Cloud Storage at {where} for gs://{bucket} "
            f"({type(e).__name__}); check the network (or STORAGE_EMULATOR_HOST)"
        ) from None
