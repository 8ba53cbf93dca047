"""Sweep hyperparameters with Ray Tune: every trial is a whole two-tower run, ASHA stops the bad ones.

Launch commands (copy-paste):

    python jobs/tune.py --preset tiny --search optimizer.lr=loguniform:1e-3:1e-1 --samples 4
    python jobs/tune.py --preset demo --search optimizer.lr=loguniform:1e-3:1e-1 \\
        --search model.dropout=choice:0.3,0.5 --samples 8 --max-concurrent 2 --name lr-dropout
    python jobs/tune.py --config my.yaml --data /mnt/my-256 --storage /mnt/runs \\
        --search optimizer.weight_decay=loguniform:1e-5:1e-3 --samples 16
    python jobs/train.py --config ~/alexnet-ray/runs/lr-dropout/best.yaml   # the winner, as a run of its own

Distributions: loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH, choice:V1,V2,..., grid:V1,V2,...
Writes into <storage>/<name>/: results.txt (the table), sweep.png (val error against each swept
value), best.yaml. The last line printed is one JSON object: best trial, its values, its val error.
"""

import argparse
import json
import sys

from alexnet_ray.train.config import ConfigError, add_config_arguments, config_from_args


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--search", metavar="SECTION.KEY=DIST:ARGS", action="append", default=[],
                       help="a swept field, e.g. optimizer.lr=loguniform:1e-3:1e-1 (repeatable)")
    sweep.add_argument("--samples", type=int, default=4, help="trials to draw (each grid value this many times)")
    sweep.add_argument("--max-concurrent", type=int, default=None,
                       help="trials at once (default: as many as the cluster can place)")
    sweep.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs before it may be stopped")
    sweep.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the best 1/N at each rung")
    sweep.add_argument("--sweep-name", default=None, help="the sweep's folder under --storage (default: sweep-<time>)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else local)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from alexnet_ray.train.sweep import Sweep
    from alexnet_ray.visualize import run_pictures

    try:
        if args.name is not None:
            raise ConfigError("--name: each trial names its own run; name the sweep with --sweep-name")
        config = config_from_args(args)
        sweep = Sweep(config, args.search, samples=args.samples, max_concurrent=args.max_concurrent,
                      name=args.sweep_name, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                      address=args.address, pictures=run_pictures)
        result = sweep.fit()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from alexnet_ray import storage
    from alexnet_ray.visualize import draw_sweep

    table = result.table()
    storage.write_bytes_atomic(storage.join(result.path, "results.txt"), (table + "\n").encode())
    picture = draw_sweep(result.panels(), storage.join(result.path, "sweep.png"), title=f"sweep {result.name}")
    print(table)
    try:
        best = result.best
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    best_yaml = result.write_best_yaml(storage.join(result.path, "best.yaml"))
    print(f"best: trial {best.trial_id}, val top-1 error {best.final_val_top1_error:.4f}; "
          f"table {storage.join(result.path, 'results.txt')}, picture {picture}, config {best_yaml}")
    print(json.dumps({"best_trial": best.trial_id, "values": best.values, "val_top1_error": best.final_val_top1_error,
                      "epochs": best.epochs_run, "best_config": best_yaml, "sweep_dir": result.path,
                      "trials": len(result.rows), "stopped_early": sum(r.stopped_early for r in result.rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
