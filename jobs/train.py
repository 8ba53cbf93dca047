"""Train AlexNet with two towers on Ray.

Launch commands (copy-paste):

    python jobs/train.py                                   # demo preset, embedded dataset, local Ray
    python jobs/train.py --preset tiny --epochs 2          # the smallest run that still learns
    python jobs/train.py --preset paper --data /datasets/imagenet-prepared --storage s3://bucket/runs --name paper-1
    python jobs/train.py --config my.yaml --set parallel.replicas=4 --set data.global_batch_size=512 --set optimizer.lr_scaling=sqrt
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- python jobs/train.py --preset tiny

Re-running with the same --name and --storage resumes from the run's latest checkpoint.
The last line printed is one JSON object: val_top1_error, val_top5_error, train_loss, epochs, checkpoint.
"""

import argparse
import json
import sys

from alexnet_ray.train.config import ConfigError, add_config_arguments, config_from_args


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else a local cluster of its own)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from alexnet_ray.train.metrics import clock
    from alexnet_ray.train.trainer import Trainer
    from alexnet_ray.visualize import run_pictures

    try:
        result = Trainer(config, address=args.address, pictures=run_pictures).fit()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # TrainingFailedError and friends: say why, exit non-zero
        from alexnet_ray.storage_retries import gave_up_line

        cause = e.__cause__ or e
        print(f"error: training failed: {gave_up_line(e) or f'{type(cause).__name__}: {cause}'}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    summary = {
        "val_top1_error": metrics.get("val_top1_error"),
        "val_top5_error": metrics.get("val_top5_error"),
        "train_loss": metrics.get("train_loss"),
        "epochs": metrics.get("epoch"),
        "checkpoint": result.checkpoint_uri,
    }
    rate = f", {result.images_per_s:,.0f} img/s on average" if result.images_per_s else ""
    print(f"done: {summary['epochs']} epochs in {clock(result.wall_s)}{rate}, val top-1 error "
          f"{summary['val_top1_error']:.3f}, top-5 {summary['val_top5_error']:.3f}, run dir {result.run_uri}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
