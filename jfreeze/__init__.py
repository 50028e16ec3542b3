"""jfreeze: train only part of a JAX model, exactly.

Selectors describe what is frozen (whole leaves or single elements), label
functions and transforms feed optax, and forward-pass helpers keep frozen
weight gradients out of the compiled step.

**The namespace has one rule.** Everything a user calls, and every type a user
receives, is at the top level, ``jf.<name>`` (``import jfreeze as jf``), listed
once in ``__all__``, as in optax and Equinox. The one exception is an adapter
whose types come from an optional dependency: it is a submodule imported on
first use, ``jf.flax`` (linen modules, a ``TrainState``, NNX filters), so
``import jfreeze`` never imports Flax. A function that merely *uses* an optional
dependency inside stays at the top level and imports it when called
(``jf.save_trainable`` / ``jf.restore_trainable`` import orbax). Each public name
has one public path: the modules that define them (``jfreeze.selectors``,
``jfreeze.transforms``, ``jfreeze.labeling``, ...; see ``docs/ARCHITECTURE.md``)
are where the code lives, not a second spelling, and no module is named like a
function (``jf.labels`` is a function; its module is ``jfreeze.labeling``).
Modules whose name starts with ``_`` are private.
"""

from jfreeze._tree import Mask, path_str
from jfreeze.checkpoint import check_manifest, freeze_manifest, restore_trainable, save_trainable
from jfreeze.checks import ComputeReport, check_frozen_compute, compiled_flops
from jfreeze.forward import merge, split, stop_gradient
from jfreeze.inspection import Row, Summary, assert_frozen, summary
from jfreeze.labeling import Labels, labels
from jfreeze.population import (
    models_mesh,
    population_compiler_options,
    shard_stacked,
    stack,
    unstack,
    vmap_models,
)
from jfreeze.scaling import LayerwiseDecay, layerwise_decay, scale_by_label
from jfreeze.scanning import scan
from jfreeze.schedules import GradualUnfreezeState, gradual_unfreeze, thawed_value_and_grad
from jfreeze.selectors import (
    FrozenSpec,
    Selector,
    as_selector,
    elements,
    everything,
    layers,
    nothing,
    paths,
    regex,
    where,
)
from jfreeze.transforms import (
    apply_updates,
    freeze,
    inner_state,
    partition,
    schedule_free_eval_params,
    set_inner_state,
)

__version__ = "0.1.0"

__all__ = [
    "ComputeReport",
    "FrozenSpec",
    "GradualUnfreezeState",
    "Labels",
    "LayerwiseDecay",
    "Mask",
    "Row",
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
    "inner_state",
    "labels",
    "layers",
    "layerwise_decay",
    "merge",
    "models_mesh",
    "nothing",
    "partition",
    "path_str",
    "paths",
    "population_compiler_options",
    "regex",
    "restore_trainable",
    "save_trainable",
    "scale_by_label",
    "scan",
    "schedule_free_eval_params",
    "set_inner_state",
    "shard_stacked",
    "split",
    "stack",
    "stop_gradient",
    "summary",
    "thawed_value_and_grad",
    "unstack",
    "vmap_models",
    "where",
]


def __getattr__(name: str):
    # `jf.flax` without importing flax at `import jfreeze` time.
    if name == "flax":
        import importlib

        return importlib.import_module("jfreeze.flax")
    raise AttributeError(f"module 'jfreeze' has no attribute {name!r}")
