"""Evaluate a checkpoint on a prepared dataset: top-1/top-5 error, centre crop or the paper's 10 crops.

Batch inference with Ray Data: CPU tasks read and crop the shards, an actor pool scores them (one
GPU per actor when the cluster has GPUs). Every image of the split is counted exactly once.

Launch commands (copy-paste):

    python jobs/evaluate.py ~/alexnet-ray/runs/demo/checkpoint_epoch_0030 --data ~/.cache/alexnet-ray/demo-seed0-73px
    python jobs/evaluate.py ~/alexnet-ray/runs/paper-1 --data /datasets/imagenet-256 --ten-crop --batch-size 256
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \
        python jobs/evaluate.py /shared/runs/paper-1 --data /shared/imagenet-256 --ten-crop

CHECKPOINT is a checkpoint directory, its checkpoint.pt, or a run directory (its latest checkpoint).
The last line printed is one JSON object: top1_error, top5_error, images, ten_crop (and loss, split,
checkpoint, actors, gpu, seconds).
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory or file, or a run directory")
    p.add_argument("--data", required=True, help="a prepared dataset (jobs/prepare.py)")
    p.add_argument("--split", default="val")
    p.add_argument("--ten-crop", action="store_true", help="the paper's 10 crops, softmax averaged")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--actors", type=int, default=None, help="scoring actors (default: one per GPU, else 2)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpu", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else a local cluster of its own)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from alexnet_ray.eval.batch import evaluate, format_summary

    try:
        result = evaluate(args.checkpoint, args.data, split=args.split, ten_crop=args.ten_crop,
                          batch_size=args.batch_size, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                          use_gpu=args.gpu, progress=not args.no_progress,
                          address=args.address)
    except ValueError as e:  # CheckpointError, DatasetMismatchError, bad manifest, bad arguments
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # storage failing past ALEXNET_RAY_STORAGE_RETRY_S: its one line
        from alexnet_ray.storage_retries import gave_up_line

        if gave_up_line(e) is None:
            raise
        print(f"error: {gave_up_line(e)}", file=sys.stderr)
        return 1
    print(format_summary(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
