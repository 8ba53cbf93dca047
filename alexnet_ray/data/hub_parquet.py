"""Hugging Face datasets as the Hub ships them: Parquet files per split (data/train-00000-of-00004.parquet,
validation/0000.parquet, ...), an `image` struct of `bytes` and `path`, an integer `label`.

The class names come with the files: `datasets` writes its features as JSON into the Arrow schema
metadata under the key `huggingface` (info.features.<label column>.names for a ClassLabel). The
plan reads each file's footer, labels and image paths (one task each, never the image bytes);
a shard task reads the row groups holding its rows, image column only, once each.
"""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from alexnet_ray import storage
from alexnet_ray.data.sources import (Listing, SourceImage, choose_val_split, files_by_split, image_name,
                                      map_tasks, relative_files)


def _features(schema: pa.Schema) -> dict:
    metadata = schema.metadata or {}
    try:
        info = json.loads(metadata.get(b"huggingface", b"{}"))
    except ValueError:
        return {}
    return (info.get("info") or {}).get("features") or {}


def _image_column(schema: pa.Schema, features: dict) -> str | None:
    for name, feature in features.items():
        if isinstance(feature, dict) and feature.get("_type") == "Image" and name in schema.names:
            return name
    for field in schema:  # no metadata: a struct of bytes and path is an image
        if pa.types.is_struct(field.type) and {"bytes", "path"} <= {f.name for f in field.type}:
            return field.name
    return None


def _label_column(schema: pa.Schema, features: dict) -> str | None:
    labels = [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"]
    for name in (["label"] if "label" in labels else []) + labels + ["label", "labels"]:
        if name in schema.names and pa.types.is_integer(schema.field(name).type):
            return name
    return None


def index_parquet(location: str) -> dict:
    """One file's columns, class names, row groups, labels and image paths (no image bytes)."""
    try:
        with storage.open_input(location) as source:
            file = pq.ParquetFile(source)
            schema = file.schema_arrow
            features = _features(schema)
            image, label = _image_column(schema, features), _label_column(schema, features)
            if image is None:
                raise ValueError(f"{location}: no image column (expected a struct of bytes and path)")
            if label is None:
                raise ValueError(f"{location}: no label column (expected an integer 'label', a ClassLabel)")
            table = file.read(columns=[f"{image}.path", label], use_threads=False)
            groups = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{location}: not a readable Parquet file ({str(error).splitlines()[0]})") from None
    names = (features.get(label) or {}).get("names")
    return {"image": image, "label": label, "names": names, "groups": groups,
            "labels": table.column(label).to_pylist(), "paths": table.column(image).combine_chunks().field("path").to_pylist()}


def find_parquet_images(src: str, val_split: str | None, use_ray: bool) -> Listing:
    splits = files_by_split(src, relative_files(src, ".parquet"), "Parquet files")
    order = [(split, location) for split in sorted(splits) for location in splits[split]]
    indexes = dict(zip(order, map_tasks(index_parquet, [(location,) for _, location in order], use_ray)))
    first = splits["train"][0]
    names = indexes[("train", first)]["names"]
    if not names:
        raise ValueError(f"{first}: no class names: its Arrow schema metadata has no 'huggingface' key with "
                         f"info.features.{indexes[('train', first)]['label']}.names (a ClassLabel)")
    for (split, location), index in indexes.items():
        if index["names"] not in (None, names):
            raise ValueError(f"{location}: its class names differ from {first}'s")
    labelled = [split for split in splits if any(label is not None and label >= 0
                                                 for location in splits[split]
                                                 for label in indexes[(split, location)]["labels"])]
    chosen = choose_val_split(src, sorted(splits), labelled, val_split)
    listing = Listing("parquet", list(names), {}, labels_from="the Parquet label column")
    for split, prepared in (("train", "train"), (chosen, "val")):
        if split is None:
            continue
        images = []
        for location in splits[split]:
            index = indexes[(split, location)]
            row = 0
            stem = posixpath.splitext(storage.base_name(location))[0]
            for group, rows in enumerate(index["groups"]):
                for in_group in range(rows):
                    label, path = index["labels"][row], index["paths"][row] or f"{stem}-{row:06d}"
                    known = label is not None and 0 <= label < len(names)
                    images.append(SourceImage(
                        f"{location}[row {row}]", label if known else -1, names[label] if known else "",
                        image_name(names[label] if known else "", path), ("row", location, group, in_group, index["image"]),
                        unit=f"{location}#{group}", problem="" if known else f"label {label} is not a class"))
                    row += 1
        listing.splits[prepared] = images
    return listing
