"""Pictures of a run: conv1_kernels.png (the paper's Figure 3, one labelled block per tower) and
curves.png (loss and top-1/top-5 train/val error against epoch), plus each tower's mean kernel chroma.

Launch commands (copy-paste):

    python jobs/visualize.py ~/alexnet-ray/runs/demo --out pictures/            # latest checkpoint
    python jobs/visualize.py ~/alexnet-ray/runs/demo/checkpoint_epoch_0010 --out pictures/epoch10

Chroma is 0 for grey kernels and grows with colour (see alexnet_ray/visualize.py): in the paper one
tower's kernels are largely colour-agnostic, the other's colour-specific.
The last line printed is one JSON object: conv1_kernels, curves, tower_chroma, epochs.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory or file, or a run directory (its latest)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--run-dir", default=None, help="where metrics/epoch_NNNN.json live (default: the checkpoint's run)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from alexnet_ray.visualize import visualize

    try:
        result = visualize(args.checkpoint, args.out, run_dir=args.run_dir)
    except ValueError as e:  # CheckpointError, bad metrics files
        print(f"error: {e}", file=sys.stderr)
        return 2
    for tower, chroma in enumerate(result["tower_chroma"]):
        print(f"tower {tower}: mean conv1 kernel chroma {chroma:.3f}")
    print(f"wrote {result['conv1_kernels']} and {result['curves']} ({result['epochs']} epochs)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
