"""Evaluation (Ray Data batch inference, centre crop or the paper's ten crops) and prediction.

    from alexnet_ray.eval import evaluate, predict_files, load_inference_model
    evaluate("runs/demo/checkpoint_epoch_0030", "/data/imagenet-256", ten_crop=True)
"""

from alexnet_ray.eval.scoring import (
    DatasetMismatchError,
    check_classes,
    class_probabilities,
    resolve_checkpoint,
)
from alexnet_ray.preprocess import average_crops

__all__ = [
    "evaluate", "predict_files", "load_inference_model", "average_crops", "class_probabilities",
    "check_classes", "resolve_checkpoint", "DatasetMismatchError",
]


def __getattr__(name):  # Ray and Pillow load only when used
    if name == "evaluate":
        from alexnet_ray.eval.batch import evaluate

        return evaluate
    if name in ("predict_files", "load_inference_model"):
        from alexnet_ray.eval import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'alexnet_ray.eval' has no attribute {name!r}")
