"""Prepared TFDS catalog datasets (``data.source=tfds:NAME[/CONFIG]``), for text and dialogues.

Nothing is downloaded at run time: the dataset must already be built in array_record format
(random access for grain) under ``data.tfds_data_dir`` or TFDS's default folder. ``open_dataset``
checks that, the feature a source reads and both splits, each failure in one line with the fix;
``dataset_key`` is the dataset's identity for the token and tokenizer caches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from gptjax.config import DataConfig
from gptjax.errors import GptjaxError


def open_dataset(name: str, data: DataConfig, *, feature: str, fix: str) -> tuple[Any, dict]:
    """The prepared builder of ``tfds:NAME`` and ``{split: num_examples}`` of the train and
    validation splits; ``feature`` must be one of its features (``fix`` says what to do if not)."""
    source = f"tfds:{name}"
    if data.tfds_data_dir and not Path(data.tfds_data_dir).expanduser().is_dir():
        raise GptjaxError(
            f"data.tfds_data_dir={data.tfds_data_dir!r} does not exist; point it "
            f"at the folder where `tfds build` wrote {name}"
        )
    try:
        builder = tfds.builder(name, data_dir=data.tfds_data_dir or None)
    except ValueError as e:  # DatasetNotFoundError and unknown configs are ValueErrors
        first = str(e).strip().splitlines()[0]
        raise GptjaxError(
            f"data.source={source!r}: unknown tfds dataset ({first}); see "
            f"https://www.tensorflow.org/datasets/catalog for names"
        ) from None
    if not builder.is_prepared():
        raise GptjaxError(
            f"data.source={source!r} is not prepared in {builder.data_dir} (nothing is "
            f"downloaded at run time): run `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR` and set --data.tfds_data_dir=DIR"
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise GptjaxError(
            f"data.source={source!r} is stored as {builder.info.file_format.value}, but random "
            f"access needs array_record: rebuild with `tfds build {name} "
            f"--file_format=array_record`"
        )
    features = builder.info.features
    if feature not in features:
        raise GptjaxError(
            f"data.source={source!r} has no {feature!r} feature (it has "
            f"{sorted(features.keys())}); {fix}"
        )
    splits = {}
    for split in (data.tfds_train_split, data.tfds_val_split):
        try:  # TFDS split syntax works too: "train[:10%]", "train+test"
            splits[split] = builder.info.splits[split].num_examples
        except (KeyError, ValueError):
            raise GptjaxError(
                f"split {split!r} is not in {source}; set data.tfds_train_split / "
                f"data.tfds_val_split to one of {sorted(builder.info.splits)}"
            ) from None
    return builder, splits


def dataset_key(builder, splits: dict, *extra: Any) -> str:
    """A stable identity of the dataset's content: name, config, version, folder, the splits
    read and their sizes, plus ``extra`` (e.g. the feature and format version)."""
    ident = (builder.name, builder.builder_config_name, str(builder.version))
    parts = (*ident, str(builder.data_dir), sorted(splits.items()), *extra)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def describe(source: str, builder, data: DataConfig, splits: dict) -> str:
    """One line: the dataset, its version and the split rule with example counts."""
    train, val = data.tfds_train_split, data.tfds_val_split
    return (
        f"{source} ({builder.version}): train = {train} ({splits[train]:,} examples), "
        f"validation = {val} ({splits[val]:,} examples)"
    )
