"""WebDataset shards (train-000000.tar, ...: members KEY.jpg + KEY.cls, the class id as text), read in place.

The plan indexes each shard (one task each: member offsets and the .cls texts), and every image is
then a byte range of its shard. Class names come from a file (one per line, line i naming class i,
or a JSON list), or are the ids themselves.
"""

from __future__ import annotations

import json
import posixpath

from alexnet_ray import storage
from alexnet_ray.data.images import IMAGE_EXTENSIONS
from alexnet_ray.data.sources import (Listing, SourceImage, choose_val_split, files_by_split, image_name,
                                      map_tasks, relative_files)
from alexnet_ray.data.tars import index_tar


def _key_and_extension(member: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(member)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def index_shard(location: str) -> list[tuple]:
    """(key, image member name, offset, size or None when it has no image, class id text or None)
    per sample of one shard, in shard order."""
    samples: dict[str, dict] = {}
    for member in index_tar(location, read=(".cls",)):
        key, extension = _key_and_extension(member.name)
        sample = samples.setdefault(key, {})
        if extension == "cls":
            sample["cls"] = (member.data or b"").decode(errors="replace").strip()
        elif "." + extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and "image" not in sample:
            sample["image"] = (member.name, member.offset, member.size)
    return [(key, *(s.get("image") or (None, None, None)), s.get("cls")) for key, s in samples.items()]


def read_class_names(path: str) -> list[str]:
    """Class names, index = class id: a JSON list, or one name per line."""
    if not storage.is_file(path):
        raise ValueError(f"--class-names {path} does not exist")
    text = storage.read_text(path)
    if text.lstrip().startswith("["):
        try:
            names = [str(n) for n in json.loads(text)]
        except ValueError as error:
            raise ValueError(f"--class-names {path}: not a JSON list ({error})") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--class-names {path} holds no names")
    return names


def find_shard_images(src: str, class_names: str | None, val_split: str | None, use_ray: bool) -> Listing:
    splits = files_by_split(src, relative_files(src, ".tar"), "WebDataset shards")
    order = [(split, location) for split in sorted(splits) for location in splits[split]]
    indexes = dict(zip(order, map_tasks(index_shard, [(location,) for _, location in order], use_ray)))
    ids = {}
    for (split, location), samples in indexes.items():
        for key, name, _, _, cls in samples:
            if cls is not None and cls.isdigit():
                ids.setdefault(int(cls), (location, key))
    names = read_class_names(class_names) if class_names else [str(i) for i in range(max(ids, default=-1) + 1)]
    if ids and max(ids) >= len(names):
        location, key = ids[max(ids)]
        raise ValueError(f"{location}: sample {key} has class id {max(ids)}, past the {len(names)} names "
                         f"in --class-names {class_names}")
    labelled = [split for split in splits
                if any(s[4] is not None for location in splits[split] for s in indexes[(split, location)])]
    chosen = choose_val_split(src, sorted(splits), labelled, val_split)
    listing = Listing("webdataset", names, {}, labels_from="the .cls members")
    for split, prepared in (("train", "train"), (chosen, "val")):
        if split is None:
            continue
        images = []
        for location in splits[split]:
            for key, member, offset, size, cls in indexes[(split, location)]:
                problem = ("no image member" if member is None else "no .cls member" if cls is None
                           else "" if cls.isdigit() else f".cls is not a class id: {cls[:20]!r}")
                label = -1 if problem else int(cls)
                class_name = "" if problem else names[label]
                ref = ("range", location, offset, size) if member is not None else ()
                images.append(SourceImage(f"{location}/{member or key}", label, class_name,
                                          image_name(class_name, member or key), ref, problem=problem))
        listing.splits[prepared] = images
    return listing
