"""alexnet-ray: AlexNet as the 2012 paper trained it - two towers exchanging activations only at the
cross-connect layers - scaled out with Ray Data and Ray Train.

Heavy submodules (Ray) load lazily, so `import alexnet_ray` stays cheap for model-only users.
"""

__version__ = "0.1.0"

_LAZY = {
    "AlexNet": ("alexnet_ray.model", "AlexNet"),
    "Tower": ("alexnet_ray.model", "Tower"),
    "ModelConfig": ("alexnet_ray.model", "ModelConfig"),
    "Trainer": ("alexnet_ray.train.trainer", "Trainer"),
    "Sweep": ("alexnet_ray.train.sweep", "Sweep"),
    "Config": ("alexnet_ray.train.config", "Config"),
    "load_exported": ("alexnet_ray.export", "load_exported"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'alexnet_ray' has no attribute {name!r}")


__all__ = sorted(_LAZY)
