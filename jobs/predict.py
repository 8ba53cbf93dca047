"""Top-5 classes and probabilities for image files, with the same preprocessing as evaluation.

Launch commands (copy-paste):

    python jobs/predict.py alexnet-demo.pt photo1.jpg photo2.png            # a readable table
    python jobs/predict.py alexnet-demo.pt images/*.jpg --json              # one JSON object per line
    python jobs/predict.py ~/alexnet-ray/runs/demo photo.jpg --ten-crop     # a checkpoint works too

MODEL is an exported file (jobs/export.py) or a checkpoint / run directory. With --json each line is
{"image": path, "top5": [[class_name, probability], ...]}. An unreadable image gets one error line
on stderr and the exit code is 1; the other images are still predicted.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="exported model file, or a checkpoint / run directory")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.add_argument("--ten-crop", action="store_true")
    p.add_argument("--top", type=int, default=5, help="how many classes per image (default 5)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from alexnet_ray.eval.predict import format_table, load_inference_model, predict_files
    from alexnet_ray.storage_retries import StorageRetryError

    try:
        model = load_inference_model(args.model)
    except (ValueError, StorageRetryError) as e:  # ExportError, CheckpointError; storage past its retries
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = predict_files(model, args.images, k=args.top, ten_crop=args.ten_crop)
    good = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
    if args.json:
        for r in good:
            print(json.dumps(r))
    else:
        print(format_table(good))
    return 1 if len(good) < len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
