"""Prepare ImageNet as downloaded (tarballs, Parquet, WebDataset, a folder tree) -> Parquet shards of 256x256 JPEGs + manifest.

    # SRC holds any of these, told apart by their contents (--format names one; docs/preparing.md):
    #   ILSVRC2012_img_train.tar + ILSVRC2012_img_val.tar + ILSVRC2012_devkit_t12.tar.gz, never extracted;
    #   Hugging Face Parquet (data/train-00000-of-00004.parquet, data/validation-...);
    #   WebDataset shards (train-000000.tar, val-000000.tar: KEY.jpg + KEY.cls);
    #   a folder tree train/<class>/ with val/, validation/ or test/ (--val-split NAME, or none).
    python jobs/prepare.py s3://raw/ilsvrc2012 s3://datasets/imagenet-256      # the three official files
    python jobs/prepare.py s3://raw/imagenet-1k s3://datasets/imagenet-256     # the Hub's Parquet files
    python jobs/prepare.py s3://raw/wds s3://datasets/imagenet-256 --class-names s3://raw/wds/classes.txt

    # ILSVRC2012 (train/<wnid>/*.JPEG, flat val/ + Kaggle's LOC_val_solution.csv), on a Ray cluster
    # (SRC and OUT on storage every node can read/write: NFS or a bucket):
    ray job submit --working-dir . -- python jobs/prepare.py /data/ILSVRC/Data/CLS-LOC /data/imagenet-256 \
        --val-labels /data/LOC_val_solution.csv

    # the same on this machine (starts a local Ray cluster using every core):
    python jobs/prepare.py /data/imagenet /data/imagenet-256 --val-labels /data/val_labels.txt

    # any folder-per-class tree (SRC/train/<class>/<image>, SRC/val/<class>/<image>):
    python jobs/prepare.py ~/flowers ~/flowers-256 --layout folder

    # a bucket to a bucket (SRC and OUT are local/NFS paths or s3:// / gs:// URIs; for MinIO & co.
    # export AWS_ENDPOINT_URL=http://host:9000):
    python jobs/prepare.py s3://raw/ILSVRC/Data/CLS-LOC s3://datasets/imagenet-256 --val-labels s3://raw/LOC_val_solution.csv

    # the embedded demo dataset, stored at 72 px for image_size 64:
    python -c "from alexnet_ray.data.demo import write_demo_dataset; write_demo_dataset('/tmp/demo-src')"
    python jobs/prepare.py /tmp/demo-src /tmp/demo-72 --size 72

Every shard is written by a Ray task straight to OUT, whole or not at all; the manifest comes last.
Run the same command again after an interruption: finished shards are kept, the rest written.
Bad files are skipped and listed in OUT/manifest.json ("skipped"); --on-bad-image fail stops at
the first one, naming it. A finished OUT (with a manifest) is refused unless --overwrite.
"""

import argparse
import sys

from alexnet_ray.data.formats import FORMATS
from alexnet_ray.data.prepare import prepare_dataset


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", help="what you downloaded (tarballs, Parquet, WebDataset shards or a tree): "
                                    "a path or a bucket URI")
    parser.add_argument("out", help="output folder for shards and manifest.json: a path or a bucket URI")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="what SRC holds (default: told by its contents)")
    parser.add_argument("--layout", choices=["auto", "imagenet", "folder"], default="auto",
                        help="a tree's val split: flat + --val-labels (imagenet) or <class>/ folders")
    parser.add_argument("--val-labels", default=None,
                        help="ImageNet val labels: LOC_val_solution.csv or 'filename wnid' lines")
    parser.add_argument("--devkit", default=None,
                        help="ILSVRC2012_devkit_t12.tar.gz (or its folder) for the val tarball's labels "
                             "(default: the one in SRC)")
    parser.add_argument("--class-names", default=None,
                        help="WebDataset class names, line i naming class i (default: the ids)")
    parser.add_argument("--val-split", default=None,
                        help="the split to prepare as val (val, validation, test, ...), or none for train alone")
    parser.add_argument("--size", type=int, default=256, help="stored image side (default 256)")
    parser.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip")
    parser.add_argument("--shard-mb", type=float, default=64, help="approximate shard size in MB (default 64)")
    parser.add_argument("--row-group-rows", type=int, default=64,
                        help="rows per Parquet row group, the unit training reads and shuffles (default 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared OUT")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else a local cluster of its own)")
    args = parser.parse_args(argv)
    try:
        prepare_dataset(args.src, args.out, source_format=args.format, layout=args.layout, val_labels=args.val_labels,
                        devkit=args.devkit, class_names=args.class_names, val_split=args.val_split, size=args.size,
                        on_bad_image=args.on_bad_image, shard_mb=args.shard_mb, row_group_rows=args.row_group_rows,
                        overwrite=args.overwrite, address=args.address)
    except ValueError as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # storage failing past ALEXNET_RAY_STORAGE_RETRY_S: its one line
        from alexnet_ray.storage_retries import gave_up_line

        if gave_up_line(error) is None:
            raise
        print(f"prepare: {gave_up_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
