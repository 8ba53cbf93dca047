"""The official ILSVRC2012 download, read as it is: ILSVRC2012_img_train.tar (one tar per class inside),
ILSVRC2012_img_val.tar (flat JPEGs) and the devkit's validation ground truth, never extracted.

The plan indexes the training tarball (its per-class tars), then each class tar (one task each),
and the val tarball; every image is then a byte range of a tarball, read by the shard task that
stores it. The devkit (ILSVRC2012_devkit_t12.tar.gz, or its extracted folder) gives the val labels:
data/ILSVRC2012_validation_ground_truth.txt holds one ILSVRC2012_ID per val image in file order,
data/meta.mat's synsets map an ID to its wnid (IDs of leaf classes, num_children 0, are 1..1000).
"""

from __future__ import annotations

import io
import posixpath
import tarfile

from alexnet_ray import storage
from alexnet_ray.data.layouts import label_flat, read_val_labels
from alexnet_ray.data.sources import Listing, SourceImage, choose_val_split, image_name, map_tasks
from alexnet_ray.data.tars import index_tar

META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def tarballs(src: str) -> dict[str, str]:
    """{"train", "val", "devkit"} -> the ILSVRC2012 files directly in `src` (by their names)."""
    found: dict[str, str] = {}
    for info in storage.list_dir(src):
        name = info.base_name.lower()
        if "devkit" in name and (name.endswith((".tar.gz", ".tgz", ".tar")) or storage.is_dir(storage.join(src, info.base_name))):
            found.setdefault("devkit", storage.join(src, info.base_name))
        elif name.endswith(".tar") and "train" in name:
            found.setdefault("train", storage.join(src, info.base_name))
        elif name.endswith(".tar") and "val" in name:
            found.setdefault("val", storage.join(src, info.base_name))
    return found


def _devkit_files(devkit: str) -> dict[str, bytes]:
    """META and GROUND_TRUTH from the devkit tarball or its extracted folder."""
    wanted = (META, GROUND_TRUTH)
    found: dict[str, bytes] = {}
    if storage.is_dir(devkit):
        root = storage.resolve(devkit)[1].rstrip("/")
        for info in storage.list_dir(devkit, recursive=True):
            for name in wanted:
                if info.path.endswith("/" + name) and name not in found:
                    found[name] = storage.read_bytes(storage.join(devkit, info.path[len(root) + 1:]))
    elif storage.is_file(devkit):
        try:
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(devkit)), mode="r:*") as archive:
                for member in archive:
                    for name in wanted:
                        if (member.name == name or member.name.endswith("/" + name)) and name not in found:
                            found[name] = archive.extractfile(member).read()
        except tarfile.TarError as error:
            raise ValueError(f"--devkit {devkit}: not a readable tarball ({error})") from None
    else:
        raise ValueError(f"--devkit {devkit} does not exist")
    for name in wanted:
        if name not in found:
            raise ValueError(f"--devkit {devkit}: no {name} in it")
    return found


def read_devkit(devkit: str) -> tuple[dict[int, str], list[int]]:
    """(ILSVRC2012_ID -> wnid for the leaf classes, the val ground truth's IDs in file order)."""
    files = _devkit_files(devkit)
    try:
        import scipy.io
    except ImportError:
        raise ValueError("reading the devkit's meta.mat needs scipy: pip install 'alexnet-ray[ilsvrc]'") from None
    try:
        synsets = scipy.io.loadmat(io.BytesIO(files[META]), squeeze_me=True)["synsets"]
        ids, wnids, children = synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"--devkit {devkit}: {META} has no synsets with ILSVRC2012_ID, WNID and num_children "
                         f"({error})") from None
    leaves = {int(i): str(w) for i, w, c in zip(ids.ravel(), wnids.ravel(), children.ravel()) if int(c) == 0}
    truth = []
    for number, line in enumerate(files[GROUND_TRUTH].decode().splitlines(), 1):
        if line.strip():
            try:
                truth.append(int(line))
            except ValueError:
                raise ValueError(f"--devkit {devkit}: {GROUND_TRUTH}:{number}: expected an ILSVRC2012_ID, "
                                 f"got {line!r}") from None
    return leaves, truth


def _val_from_devkit(devkit: str, val_tar: str, members: list, class_index: dict[str, int]) -> list[SourceImage]:
    leaves, truth = read_devkit(devkit)
    if len(truth) != len(members):
        raise ValueError(f"--devkit {devkit}: {posixpath.basename(GROUND_TRUTH)} has {len(truth)} IDs for the "
                         f"{len(members)} images of {val_tar}")
    images = []
    for member, label_id in zip(members, truth):
        if label_id not in leaves:
            raise ValueError(f"--devkit {devkit}: ground-truth ID {label_id} (for {member.name}) is not a leaf "
                             f"class in {META}")
        wnid = leaves[label_id]
        if wnid not in class_index:
            raise ValueError(f"--devkit {devkit}: class {wnid} (for {member.name}) is not in {val_tar}'s "
                             "training tarball")
        images.append(SourceImage(f"{val_tar}/{member.name}", class_index[wnid], wnid, image_name(wnid, member.name),
                                  ("range", val_tar, member.offset, member.size)))
    return images


def find_tarball_images(src: str, val_labels: str | None, devkit: str | None, val_split: str | None,
                        use_ray: bool) -> Listing:
    files = tarballs(src)
    if "train" not in files:
        raise ValueError(f"{src}: no training tarball (ILSVRC2012_img_train.tar)")
    train = files["train"]
    devkit = devkit or files.get("devkit")
    present = ["val"] if "val" in files else []
    labelled = present if (val_labels or devkit) else []
    if present and not labelled and val_split != "none":
        raise ValueError(f"{files['val']}: pass --devkit (ILSVRC2012_devkit_t12.tar.gz) or --val-labels for its labels")
    chosen = choose_val_split(src, present, labelled, val_split)
    if val_labels is not None and not storage.is_file(val_labels):
        raise ValueError(f"--val-labels {val_labels} does not exist")

    [outer] = map_tasks(index_tar, [(train,)], use_ray)
    class_tars = sorted((m for m in outer if m.name.endswith(".tar")), key=lambda m: _stem(m.name))
    if not class_tars:
        raise ValueError(f"{train}: holds no per-class .tar files (expected n01440764.tar, ...)")
    classes = [_stem(m.name) for m in class_tars]
    if len(set(classes)) != len(classes):
        raise ValueError(f"{train}: two class tars named {next(c for c in classes if classes.count(c) > 1)}.tar")
    class_index = {name: i for i, name in enumerate(classes)}
    calls = [(train, m.offset, m.size, f"{train}/{m.name}") for m in class_tars]
    train_images = []
    for wnid, class_tar, members in zip(classes, class_tars, map_tasks(index_tar, calls, use_ray)):
        if not members:
            raise ValueError(f"{train}/{class_tar.name}: class tar without training images")
        train_images += [SourceImage(f"{train}/{class_tar.name}/{m.name}", class_index[wnid], wnid,
                                     image_name(wnid, m.name), ("range", train, m.offset, m.size)) for m in members]
    listing = Listing("ilsvrc-tars", classes, {"train": train_images}, labels_from=str(val_labels or devkit or ""))
    if chosen is None:
        return listing
    val = files["val"]
    [members] = map_tasks(index_tar, [(val,)], use_ray)
    members = sorted(members, key=lambda m: m.name)
    if val_labels is not None:  # Kaggle's CSV or `filename wnid` lines, by file stem
        listing.splits["val"] = label_flat([f"{val}/{m.name}" for m in members], read_val_labels(val_labels),
                                           class_index, f"--val-labels {val_labels}",
                                           [("range", val, m.offset, m.size) for m in members])
    else:
        listing.splits["val"] = _val_from_devkit(devkit, val, members, class_index)
    return listing
