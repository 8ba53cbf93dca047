"""Failures that a retry cannot fix end the run, whatever run.max_failures says (-1 would otherwise
restart the worker group forever).

Ray Train V2 retries every worker-group error up to FailureConfig.max_failures; it has no public
way for user code to mark an error as final. A UserCallback can: `after_exception` runs on the
controller when workers have raised, before the failure policy decides, and an exception raised
there becomes a ControllerError, which the policy never retries. `Trainer.fit()` unwraps it.
"""

from __future__ import annotations

from ray.train import ControllerError, UserCallback

from alexnet_ray.checkpoint import NoGoodCheckpointError
from alexnet_ray.storage_retries import causes

UNRECOVERABLE = (NoGoodCheckpointError,)  # every checkpoint of the run is unusable: a restart fails the same way


class RunCannotRecoverError(RuntimeError):
    """A worker failed in a way that restarting the worker group would only repeat."""


def unrecoverable(error: BaseException) -> BaseException | None:
    """The first unrecoverable exception in `error`'s chain, or None."""
    return next((cause for cause in causes(error) if isinstance(cause, UNRECOVERABLE)), None)


class StopUnrecoverable(UserCallback):
    """On the controller: end the run when a worker failed unrecoverably."""

    def after_exception(self, run_context, worker_exceptions):
        for rank, error in sorted(worker_exceptions.items()):
            cause = unrecoverable(error)
            if cause is not None:
                raise RunCannotRecoverError(f"worker {rank}: {cause}")


def unwrap(error: BaseException) -> BaseException:
    """The RunCannotRecoverError behind Ray's ControllerError, else `error` itself."""
    if isinstance(error, ControllerError) and isinstance(error.controller_failure, RunCannotRecoverError):
        return error.controller_failure
    return error
