"""What SRC holds, told by its contents: a folder tree, the ILSVRC2012 tarballs, Hugging Face Parquet
files or WebDataset shards; and its listing, whichever it is (sources.Listing)."""

from __future__ import annotations

from alexnet_ray import storage
from alexnet_ray.data.sources import Listing, relative_files

FORMATS = ("auto", "tree", "ilsvrc-tars", "parquet", "webdataset")
LOOKS_LIKE = {
    "tree": "a train/<class>/<image> folder tree",
    "ilsvrc-tars": "the ILSVRC2012 tarballs (ILSVRC2012_img_train.tar, a tar of per-class tars)",
    "parquet": "Hugging Face Parquet files per split (data/train-00000-of-00004.parquet, ...)",
    "webdataset": "WebDataset shards per split (train-000000.tar of KEY.jpg + KEY.cls)",
    None: "none of the formats prepare reads",
}


def _tar_kind(tar: str) -> str:
    from alexnet_ray.data.tars import first_member

    first = first_member(tar) or ""
    return "ilsvrc-tars" if first.endswith(".tar") else "webdataset"


def detect_format(src: str) -> str | None:
    """The format of `src`, from a listing of its top (and of train/ or data/) and at most one tar
    header; None when it is none of them."""
    entries = storage.list_dir(src)
    dirs = {i.base_name for i in entries if i.type.name == "Directory"}
    files = sorted(i.base_name for i in entries if i.is_file and not i.base_name.startswith("."))
    for folder in ("train", "data"):
        if folder in dirs or storage.is_dir(storage.join(src, folder)):  # object stores list no folders
            inside = storage.list_dir(storage.join(src, folder))
            names = [i.base_name.lower() for i in inside if i.is_file]
            if any(n.endswith(".parquet") for n in names):
                return "parquet"
            if any(n.endswith(".tar") for n in names):
                return "webdataset"
            if folder == "train":  # a tree (find_images says what is wrong with it, if anything)
                return "tree"
    if any(n.lower().endswith(".parquet") for n in files):
        return "parquet"
    tars = [n for n in files if n.lower().endswith(".tar")]
    if tars:
        train = [n for n in tars if "train" in n.lower()]
        return _tar_kind(storage.join(src, (train or tars)[0]))
    if relative_files(src, ".parquet"):
        return "parquet"
    return None


def list_source(src: str, source_format: str = "auto", *, layout: str = "auto", val_labels=None, devkit=None,
                class_names=None, val_split: str | None = None, use_ray: bool = True,
                before_tasks=lambda: None) -> Listing:
    """Detect (or check `source_format`) and list `src`. ValueError in one line, before any image is
    read, for a source that is no format, another than the one asked for, or options it has no use for.
    `before_tasks()` is called before the index tasks of an archive format start (to start Ray)."""
    if source_format not in FORMATS:
        raise ValueError(f"format={source_format!r}: choose one of {', '.join(FORMATS)}")
    detected = detect_format(src)
    if source_format == "auto":
        if detected is None:
            raise ValueError(f"{src}: no train/ folder, ILSVRC2012 tarballs, Parquet files or WebDataset shards found")
    elif detected != source_format:
        raise ValueError(f"{src}: --format {source_format} expects {LOOKS_LIKE[source_format]}, "
                         f"but this holds {LOOKS_LIKE[detected]}")
    kind = detected
    for option, value, formats in (("--layout", layout != "auto", ("tree",)),
                                   ("--val-labels", val_labels is not None, ("tree", "ilsvrc-tars")),
                                   ("--devkit", devkit is not None, ("ilsvrc-tars",)),
                                   ("--class-names", class_names is not None, ("webdataset",))):
        if value and kind not in formats:
            raise ValueError(f"{option} does not apply to {src}, which holds {LOOKS_LIKE[kind]}")
    if kind == "tree":
        from alexnet_ray.data.layouts import find_images

        return find_images(src, layout, val_labels, val_split)
    if use_ray:
        before_tasks()
    if kind == "ilsvrc-tars":
        from alexnet_ray.data.ilsvrc import find_tarball_images

        return find_tarball_images(src, val_labels, devkit, val_split, use_ray)
    if kind == "parquet":
        from alexnet_ray.data.hub_parquet import find_parquet_images

        return find_parquet_images(src, val_split, use_ray)
    from alexnet_ray.data.wds import find_shard_images

    return find_shard_images(src, class_names, val_split, use_ray)
