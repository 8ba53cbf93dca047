"""Export a checkpoint as one plain PyTorch file (and optionally ONNX).

    model = alexnet_ray.load_exported(OUT)   # AlexNet in eval mode; .classes, .preprocessing

The file is loadable with torch.load(OUT, weights_only=True) and carries the constructor arguments,
the weights, the class names and the preprocessing (stored size, crop, mean/std).

Launch commands (copy-paste):

    python jobs/export.py ~/alexnet-ray/runs/demo/checkpoint_epoch_0030 alexnet-demo.pt
    python jobs/export.py ~/alexnet-ray/runs/paper-1 alexnet.pt --onnx     # also alexnet.onnx, checked
                                                                           # against PyTorch (needs [onnx])

The last line printed is one JSON object: out, classes, model_kwargs, onnx, onnx_max_abs_diff.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory or file, or a run directory (its latest)")
    p.add_argument("out", help="the export file to write (e.g. alexnet.pt)")
    p.add_argument("--onnx", action="store_true", help="also write OUT with suffix .onnx and check it")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from alexnet_ray.eval.scoring import resolve_checkpoint
    from alexnet_ray.export import export_checkpoint
    from alexnet_ray.storage_retries import StorageRetryError

    try:
        summary = export_checkpoint(resolve_checkpoint(args.checkpoint), args.out, onnx=args.onnx)
    except (ValueError, RuntimeError, StorageRetryError) as e:  # CheckpointError, ExportError, no [onnx]; storage
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {summary['classes']}-class AlexNet to {summary['out']}"
          + (f" and {summary['onnx']} (max |logit diff| {summary['onnx_max_abs_diff']:.2e})" if summary["onnx"] else ""))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
