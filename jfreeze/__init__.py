"""jfreeze: train only part of a JAX model, exactly.

Selectors describe what is frozen (whole leaves or single elements), label
functions and transforms feed optax, and forward-pass helpers keep frozen
weight gradients out of the compiled step. ``jfreeze.flax`` (imported on first
use) adapts all of it to Flax linen and NNX.
"""

from jfreeze.checkpoint import check_manifest, freeze_manifest, restore_trainable, save_trainable
from jfreeze.checks import ComputeReport, check_frozen_compute, compiled_flops
from jfreeze.forward import merge, split, stop_gradient
from jfreeze.inspection import Summary, assert_frozen, summary
from jfreeze.labels import Labels, labels
from jfreeze.paths import path_str
from jfreeze.population import shard_stacked, stack, unstack
from jfreeze.scaling import LayerwiseDecay, layerwise_decay, scale_by_label
from jfreeze.schedules import GradualUnfreezeState, gradual_unfreeze, thawed_value_and_grad
from jfreeze.selectors import (
    Selector,
    as_selector,
    elements,
    everything,
    nothing,
    paths,
    regex,
    where,
)
from jfreeze.transforms import apply_updates, freeze, partition

__version__ = "0.1.0"

__all__ = [
    "ComputeReport",
    "GradualUnfreezeState",
    "Labels",
    "LayerwiseDecay",
    "Selector",
    "Summary",
    "apply_updates",
    "as_selector",
    "assert_frozen",
    "check_frozen_compute",
    "check_manifest",
    "compiled_flops",
    "elements",
    "everything",
    "freeze",
    "freeze_manifest",
    "gradual_unfreeze",
    "labels",
    "layerwise_decay",
    "merge",
    "nothing",
    "partition",
    "path_str",
    "paths",
    "regex",
    "restore_trainable",
    "save_trainable",
    "scale_by_label",
    "shard_stacked",
    "split",
    "stack",
    "stop_gradient",
    "summary",
    "thawed_value_and_grad",
    "unstack",
    "where",
]


def __getattr__(name: str):
    # `jf.flax` without importing flax at `import jfreeze` time.
    if name == "flax":
        import importlib

        return importlib.import_module("jfreeze.flax")
    raise AttributeError(f"module 'jfreeze' has no attribute {name!r}")
