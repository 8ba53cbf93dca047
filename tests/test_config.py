"""Config: presets, YAML + overrides, round trip, and bad configurations refused with one clear message."""

import json
import math

import pytest

from alexnet_ray.data.manifest import Manifest
from alexnet_ray.train.config import (
    PRESETS,
    Config,
    ConfigError,
    load_config,
    preset_config,
    scaled_lr,
    validate_config,
)


def test_paper_preset_is_the_papers_recipe():
    c = load_config("paper", check_data=False)
    assert (c.model.num_classes, c.model.width, c.model.image_size, c.model.dropout) == (1000, 1.0, 224, 0.5)
    assert (c.model.init, c.model.activation, c.model.lrn, c.model.pool) == ("paper", "relu", True, "overlapping")
    assert (c.data.global_batch_size, c.data.pca_lighting, c.data.ten_crop_final_eval) == (128, True, True)
    assert (c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay) == (0.01, 0.9, 5e-4)
    assert (c.schedule.kind, c.schedule.plateau_factor, c.schedule.plateau_max_decays) == ("plateau", 0.1, 3)
    assert (c.parallel.towers, c.run.epochs) == (2, 90)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_a_dict(name):
    c = load_config(name, check_data=name != "paper")
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain data only
    assert Config.from_dict(d) == c


def test_demo_and_tiny_are_small():
    for name in ("demo", "tiny"):
        c = load_config(name)
        assert c.model.width <= 0.25 and c.model.image_size == 64 and c.model.num_classes == 10
        assert c.data.path is None  # the embedded demo dataset
    tiny = load_config("tiny")
    assert tiny.run.deterministic and tiny.model.dropout == 0.5 and tiny.parallel.use_gpu == "false"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\nmodel:\n  width: 0.25\n  lrn: false\nparallel:\n  use_gpu: true\nrun:\n  epochs: 5\n")
    c = load_config(path=f, overrides=["run.epochs=7", "optimizer.lr=1e-3", "run.name=abc", "data.eval_batch_size=null"])
    assert (c.model.width, c.model.lrn, c.run.epochs, c.optimizer.lr, c.run.name) == (0.25, False, 7, 1e-3, "abc")
    assert c.parallel.use_gpu == "true"  # YAML bool normalised
    assert c.model.image_size == 64  # from the tiny preset
    assert isinstance(c.optimizer.lr, float) and isinstance(c.run.epochs, int)


def test_override_types():
    c = load_config("tiny", overrides=["model.lrn=off", "model.width=1", "data.eval_batch_size=8", "parallel.use_gpu=AUTO"])
    assert c.model.lrn is False and c.model.width == 1.0 and isinstance(c.model.width, float)
    assert c.data.eval_batch_size == 8 and c.parallel.use_gpu == "auto"


def test_scaled_lr():
    assert scaled_lr(0.01, "none", 4) == 0.01
    assert scaled_lr(0.01, "linear", 512) == pytest.approx(0.04)  # from the default base of 128
    assert scaled_lr(0.01, "sqrt", 4, base_batch=1) == pytest.approx(0.02)
    assert scaled_lr(0.01, "linear", 8, base_batch=2) == pytest.approx(0.04)
    c = load_config("tiny", overrides=["optimizer.lr=0.02", "optimizer.lr_scaling=sqrt", "optimizer.base_batch_size=8"])
    assert c.effective_lr() == pytest.approx(0.02 * math.sqrt(2))  # tiny's global batch is 16
    two = load_config("tiny", overrides=["optimizer.lr=0.02", "optimizer.lr_scaling=sqrt", "optimizer.base_batch_size=8",
                                         "parallel.replicas=2"])
    assert two.effective_lr() == c.effective_lr()  # the replica count changes nothing in the math
    assert two.num_workers == 4 and two.global_batch_size == 16 and two.replica_share == 8


def test_per_replica_batch_settings_are_refused_with_what_to_write(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size \(images per replica\) is gone.*"
                                          r"data.global_batch_size=<the old data.batch_size x parallel.replicas>"):
        load_config("tiny", overrides=["data.batch_size=16"])
    f = tmp_path / "old.yaml"
    f.write_text("optimizer:\n  base_replicas: 2\n")
    with pytest.raises(ConfigError, match=r"old.yaml: optimizer.base_replicas is gone.*optimizer.base_batch_size="):
        load_config("tiny", path=f)
    with pytest.raises(ConfigError, match="data.global_batch_size=2 is smaller than parallel.replicas=4"):
        load_config("tiny", overrides=["data.global_batch_size=2", "parallel.replicas=4"], check_data=False)


def test_microbatch_rows_bound_follows_the_layout_or_the_field():
    c = load_config("tiny", overrides=["data.global_batch_size=96", "parallel.replicas=2", "parallel.microbatches=3"],
                    check_data=False)
    assert c.microbatch_rows == 16  # 96 / (2 x 3): on fewer replicas the share is cut into more micro-batches
    c.parallel.microbatch_rows = 10
    assert c.microbatch_rows == 10
    with pytest.raises(ConfigError, match="parallel.microbatch_rows=0: must be >= 1"):
        load_config("tiny", overrides=["parallel.microbatch_rows=0"], check_data=False)


BAD_OVERRIDES = [
    (["modle.width=1"], "unknown section 'modle' (did you mean model?)"),
    (["model.widht=1"], "unknown key model.widht (did you mean model.width?)"),
    (["model.width=wide"], "model.width must be a number"),
    (["run.epochs=2.5"], "run.epochs must be an integer"),
    (["model.lrn=maybe"], "model.lrn must be true or false"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: must be a positive number"),
    (["optimizer.lr=0"], "optimizer.lr=0.0: must be a positive number"),
    (["parallel.microbatches=0"], "parallel.microbatches=0: must be >= 1"),
    (["parallel.towers=4"], "parallel.towers=4: must be 1 or 2"),
    (["parallel.replicas=0"], "parallel.replicas=0: must be >= 1"),
    (["model.activation=sigmoid"], "model.activation='sigmoid': expected one of relu, tanh"),
    (["model.pool=overlaping"], "did you mean overlapping?"),
    (["schedule.kind=exp"], "schedule.kind='exp': expected one of plateau, step, cosine"),
    (["model.image_size=32"], "model.image_size=32: too small"),
    (["model.width=0"], "model.width=0.0: must be > 0"),
    (["model.dropout=1"], "model.dropout=1.0: must be in [0, 1)"),
    (["model.num_classes=1000"], "the embedded demo dataset has 10 classes"),
    (["schedule.warmup_epochs=2"], "schedule.warmup_epochs=2: must be less than run.epochs=2"),
    (["run.name=a/b"], "run.name='a/b'"),
    (["run.storage_retry_s=-1"], "run.storage_retry_s=-1.0: must be >= 0 seconds"),
    (["parallel.gpus_per_worker=0"], "parallel.gpus_per_worker=0.0: must be > 0 and <= 1"),
    (["parallel.gpus_per_worker=2"], "parallel.gpus_per_worker=2.0: must be > 0 and <= 1 (a tower uses one GPU)"),
    (["run.compile_mode=reduce-overhead"], "run.compile_mode=reduce-overhead: takes effect with run.compile=true"),
    (["run.compile=true", "run.compile_mode=fast"], "run.compile_mode='fast': expected one of default, reduce-overhead"),
    (["width=1"], "expected section.key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=[o[0][-1] for o in BAD_OVERRIDES])
def test_bad_configurations_fail_with_one_clear_message(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides=overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path=tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  width: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.width must be a number, got \[1, 2\]"):
        load_config(path=f)
    f.write_text("optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown section 'optimiser' \(did you mean optimizer\?\)"):
        load_config(path=f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path=f)
    f.write_text("preset: paper\n")
    with pytest.raises(ConfigError, match="conflicts with the requested preset 'tiny'"):
        load_config("tiny", path=f)
    with pytest.raises(ConfigError, match="unknown preset 'papr' \\(did you mean paper\\?\\)"):
        preset_config("papr")


def _prepared(root, classes, size=256):
    root.mkdir()
    Manifest(classes=classes, splits={}, size=size, mean=[0.5] * 3, std=[0.25] * 3,
             pca={"eigval": [1.0] * 3, "eigvec": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]}).save(root)
    return root


def test_data_path_checks(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"data.path={missing}: directory does not exist"):
        load_config("tiny", overrides=[f"data.path={missing}"])
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(ConfigError, match="not a prepared dataset \\(no manifest.json\\)"):
        load_config("tiny", overrides=[f"data.path={raw}"])
    five = _prepared(tmp_path / "five", [f"c{i}" for i in range(5)])
    with pytest.raises(ConfigError, match="model.num_classes=10 does not match the 5 classes in .*five/manifest.json"):
        load_config("tiny", overrides=[f"data.path={five}"])
    # fc8's 5 outputs do not split over the tiny preset's 2 towers: refused before any worker starts
    with pytest.raises(ConfigError, match=r"model.num_classes=5: does not split evenly over 2 towers \(fc8\)"):
        load_config("tiny", overrides=[f"data.path={five}", "model.num_classes=5"])
    c = load_config("tiny", overrides=[f"data.path={five}", "model.num_classes=5", "parallel.towers=1"])
    assert c.data.path == str(five)
    small = _prepared(tmp_path / "small", [f"c{i}" for i in range(10)], size=48)
    with pytest.raises(ConfigError, match="model.image_size=64 is larger than the dataset's 48x48 images"):
        load_config("tiny", overrides=[f"data.path={small}"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken/manifest.json: unreadable manifest"):
        load_config("tiny", overrides=[f"data.path={broken}"])
    # a bucket is read like a folder (tests/test_object_storage.py); check_data=False skips the reads
    assert load_config("tiny", overrides=["data.path=s3://bucket/imagenet"], check_data=False).data.path.startswith("s3://")
    with pytest.raises(ConfigError, match=r"^data.path: s3:///imagenet: no bucket in the URI \(expected s3://BUCKET/path\)$"):
        load_config("tiny", overrides=["data.path=s3:///imagenet"])
    with pytest.raises(ConfigError, match=r"^run.storage: gs://: no bucket in the URI"):
        load_config("tiny", overrides=["run.storage=gs://"], check_data=False)
    load_config("tiny", overrides=[f"data.path={missing}"], check_data=False)


def test_cluster_resource_checks():
    c = load_config("tiny", overrides=["parallel.use_gpu=true"])
    with pytest.raises(ConfigError, match="parallel.use_gpu=true but the Ray cluster has no GPU"):
        validate_config(c, cluster_resources={"CPU": 8.0})
    validate_config(c, cluster_resources={"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match="2 x 2 = 4 workers need 4 GPUs; the Ray cluster has 2"):
        c.parallel.replicas = 2
        validate_config(c, cluster_resources={"CPU": 8.0, "GPU": 2.0})
    cpu = load_config("tiny", overrides=["parallel.replicas=4", "parallel.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match="8 workers x parallel.cpus_per_worker=1 need 8 CPUs; the Ray cluster has 4"):
        validate_config(cpu, cluster_resources={"CPU": 4.0})
    validate_config(cpu, cluster_resources={"CPU": 8.0})
    auto = load_config("tiny", overrides=["parallel.use_gpu=auto"])
    validate_config(auto, cluster_resources={"CPU": 2.0})  # auto on a CPU cluster: 2 x 0.5 CPU
    shared = load_config("tiny", overrides=["parallel.use_gpu=true", "parallel.gpus_per_worker=0.5"])
    validate_config(shared, cluster_resources={"CPU": 8.0, "GPU": 1.0})  # a replica's two towers on one GPU
    shared.parallel.replicas = 2
    with pytest.raises(ConfigError, match="2 x 2 = 4 workers x parallel.gpus_per_worker=0.5 need 2 GPUs; "
                                          "the Ray cluster has 1"):
        validate_config(shared, cluster_resources={"CPU": 8.0, "GPU": 1.0})


def test_programmatic_wrong_type_is_caught():
    c = preset_config("tiny")
    c.data.global_batch_size = "16"
    with pytest.raises(ConfigError, match="data.global_batch_size must be an integer, got '16'"):
        validate_config(c)
    with pytest.raises(ConfigError, match="run.epochs must be an integer, got True"):
        Config.from_dict({"run": {"epochs": True}})


def test_command_line_options(tmp_path):
    import argparse

    from alexnet_ray.train.config import add_config_arguments, config_from_args

    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--preset", "tiny", "--set", "run.epochs=9", "--set", "model.lrn=false", "--epochs", "3",
         "--storage", str(tmp_path), "--name", "r1"]
    )
    c = config_from_args(args)
    assert (c.run.epochs, c.model.lrn, c.run.storage, c.run.name) == (3, False, str(tmp_path), "r1")
    assert config_from_args(parser.parse_args([])) == load_config("demo")
    with pytest.raises(ConfigError, match="data.path=.*nowhere: directory does not exist"):
        config_from_args(parser.parse_args(["--preset", "tiny", "--data", str(tmp_path / "nowhere")]))


def test_local_cluster_cpus_are_whole_and_cover_the_workers():
    from alexnet_ray.train.trainer import local_cluster_cpus

    one_tower = load_config("tiny", overrides=["parallel.towers=1"])  # 1 x 0.5 CPU: Ray takes whole numbers only
    assert local_cluster_cpus(one_tower, cores=2) == 5
    assert local_cluster_cpus(one_tower, cores=16) == 18
    big = load_config("tiny", overrides=["parallel.replicas=4", "parallel.cpus_per_worker=1.5", "data.global_batch_size=32"])
    assert local_cluster_cpus(big, cores=2) == 16  # ceil(2 * 4 * 1.5) + 2 + 2


def test_any_batch_over_any_micro_batch_count_is_accepted():
    """The loader's batches are uneven (an epoch's last one can be tiny): no batch size is refused."""
    for overrides in (["data.global_batch_size=16", "parallel.microbatches=3"],
                      ["data.global_batch_size=2", "parallel.microbatches=4"]):
        validate_config(load_config("tiny", overrides=overrides, validate=False), check_data=False)
