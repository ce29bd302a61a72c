"""What a torch pickle holds beyond model weights: optimizer, LR scheduler and RNG state, told by structure.

Trainers save these next to (HF ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``; Accelerate
``optimizer.bin``, ``random_states_0.pkl``) or inside (Lightning ``optimizer_states``, the tutorial
``{"model_state_dict", "optimizer_state_dict"}``) the weights. Their tensors are not parameters: an Adam state
holds two moments per parameter, so counting them doubles the model (issue 14 item 7). Names of files and keys
vary; the structures do not, and they decide here:

- an optimizer state dict (``torch.optim.Optimizer.state_dict``) has ``state`` (a dict) and ``param_groups``
  (a list); DeepSpeed's optimizer files keep their tensors under the keys of ``OPTIMIZER_KEYS``;
- an LR scheduler state dict (``LRScheduler.state_dict``) has ``last_epoch`` and ``base_lrs``/``_step_count``;
- RNG state (HF: ``{"python", "numpy", "cpu", "cuda"}``; Accelerate: ``{"random_state", "numpy_random_seed",
  "torch_manual_seed", …}``) is a dict holding a Python ``random.getstate()`` or numpy ``get_state()`` tuple;
- when the top level has a model key (``MODEL_KEYS``), only the tensors below it are parameters, the rest is
  other training state.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ckptctl.formats.model import TensorInfo, nbytes_of, numel_of
from ckptctl.formats.restricted_pickle import NumpyArray, NumpyScalar, PickledObject, TensorRef
from ckptctl.formats.torch_zip import TensorRecord, tensor_name

OPTIMIZER_KEYS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_states",
        "optimizer_state_dict",
        "optim",
        "base_optimizer_state",
        "single_partition_of_fp32_groups",
        "fp32_flat_groups",
    }
)
MODEL_KEYS = frozenset({"state_dict", "model", "module", "model_state_dict"})
ROLE_OF_KIND = {"optimizer": "optimizer", "scheduler": "scheduler", "rng_state": "rng"}
_SCAN_DEPTH = 6
_SCAN_BUDGET = 100_000


def is_optimizer_state(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list)
    )


def is_scheduler_state(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and "last_epoch" in value
        and any(k in value for k in ("base_lrs", "_step_count", "_last_lr"))
    )


def _is_python_random_state(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 3
        and value[0] in (2, 3)
        and isinstance(value[1], tuple)
        and len(value[1]) == 625
    )


def _is_numpy_random_state(value: Any) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 5
        and value[0] == "MT19937"
        and isinstance(value[1], NumpyArray)
    )


def is_rng_state(value: Any) -> bool:
    return isinstance(value, dict) and any(
        _is_python_random_state(v) or _is_numpy_random_state(v) for v in value.values()
    )


def kind_of(value: Any) -> str | None:
    """``optimizer``, ``scheduler``, ``rng_state`` or None (model weights or anything else)."""
    if is_optimizer_state(value):
        return "optimizer"
    if is_scheduler_state(value):
        return "scheduler"
    if is_rng_state(value):
        return "rng_state"
    return None


def _children(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    if isinstance(value, PickledObject):
        return list(value.fields().items())
    return []


def _child(value: Any, key: Any) -> Any:
    if isinstance(value, PickledObject):
        return value.fields().get(key)
    try:
        return value[key]
    except (KeyError, IndexError, TypeError):
        return None


def tensor_roles(obj: Any, records: tuple[TensorRecord, ...]) -> list[str]:
    """Each tensor's role (module docstring), by the containers on its path from the top of ``obj``."""
    top_has_model = isinstance(obj, dict) and any(k in MODEL_KEYS for k in obj)
    kinds: dict[int, str | None] = {}
    roles = []
    for record in records:
        node, role = obj, None
        for key in record.path:
            if id(node) not in kinds:
                kinds[id(node)] = kind_of(node)
            kind = kinds[id(node)]
            if kind is not None:
                role = ROLE_OF_KIND[kind]
                break
            if str(key) in OPTIMIZER_KEYS:
                role = "optimizer"
                break
            node = _child(node, key)
        if role is None:
            role = "other" if top_has_model and str(record.path[0]) not in MODEL_KEYS else "param"
        roles.append(role)
    return roles


def tensor_infos(
    obj: Any, records: tuple[TensorRecord, ...], aliases: dict[str, str], file: str | None = None
) -> tuple[TensorInfo, ...]:
    """A torch file's tensors as ``inspect`` shows them, each with its role."""
    return tuple(
        TensorInfo(
            record.name,
            record.dtype,
            record.shape,
            nbytes_of(record.dtype, record.shape),
            role,
            aliases.get(record.name),
            file,
        )
        for record, role in zip(records, tensor_roles(obj, records), strict=True)
    )


def find_states(obj: Any) -> list[tuple[str, str, Any]]:
    """(kind, path, value) of every optimizer, scheduler and RNG state in ``obj``, outermost first, within a
    few levels of the top (where trainers put them) and a bounded number of visits."""
    found: list[tuple[str, str, Any]] = []
    queue: deque[tuple[tuple[Any, ...], Any]] = deque([((), obj)])
    budget = _SCAN_BUDGET
    while queue and budget > 0:
        path, value = queue.popleft()
        budget -= 1
        kind = kind_of(value)
        if kind is not None:
            found.append((kind, tensor_name(path), value))
            continue
        if len(path) < _SCAN_DEPTH:
            queue += [
                ((*path, k), v) for k, v in _children(value) if not isinstance(v, (TensorRef, str, bytes))
            ]
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, bool)) for v in value):
        return list(value)
    return None


def _tensor_text(value: TensorRef) -> str:
    return f"{value.dtype}[{', '.join(str(d) for d in value.shape)}]"


def optimizer_facts(state: dict[str, Any]) -> dict[str, Any]:
    """Param groups, the parameters the optimizer tracks and their elements, per-parameter state keys
    (``exp_avg``, ``exp_avg_sq``, ``step``…) and the first group's hyperparameters."""
    groups = [g for g in state["param_groups"] if isinstance(g, dict)]
    per_param = [s for s in state["state"].values() if isinstance(s, dict)]
    tracked = 0
    for entry in per_param:
        sizes = [numel_of(v.shape) for v in entry.values() if isinstance(v, TensorRef)]
        tracked += max(sizes, default=0)
    params = sum(len(g["params"]) for g in groups if isinstance(g.get("params"), (list, tuple)))
    hyper = {str(k): _plain(v) for k, v in (groups[0].items() if groups else ()) if k != "params"}
    return {
        "param_groups": len(state["param_groups"]),
        "parameters_tracked": params,
        "parameters_with_state": len(per_param),
        "tracked_elements": tracked,
        "state_keys": sorted({str(k) for entry in per_param for k in entry}),
        "hyperparameters": {k: v for k, v in hyper.items() if v is not None},
    }


def scheduler_facts(state: dict[str, Any]) -> dict[str, Any]:
    return {str(k): _plain(v) for k, v in state.items() if _plain(v) is not None}


def _rng_text(value: Any) -> str:
    if _is_python_random_state(value):
        return f"python random.getstate() (version {value[0]}, 625 words)"
    if _is_numpy_random_state(value):
        return f"numpy MT19937 state ({value[1].describe()}, position {value[2]})"
    if isinstance(value, TensorRef):
        return f"torch generator state {_tensor_text(value)}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, TensorRef) for v in value):
        return f"{len(value)} torch generator states"
    if isinstance(value, NumpyScalar):
        return repr(value.value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return repr(value)
    return type(value).__name__


def rng_facts(state: dict[str, Any]) -> dict[str, Any]:
    """Each source's state in one line: ``python``, ``numpy``, ``cpu``, ``cuda``…"""
    return {str(k): _rng_text(v) for k, v in state.items()}


_FACTS = {"optimizer": optimizer_facts, "scheduler": scheduler_facts, "rng_state": rng_facts}


def training_state_facts(obj: Any, tensors: tuple[TensorInfo, ...]) -> dict[str, Any]:
    """``content`` (``model``, ``optimizer``, ``scheduler``, ``rng_state``, ``training_state`` when mixed,
    ``other``) and, for the first optimizer, scheduler and RNG state found, what it holds (and where)."""
    found = find_states(obj)
    facts: dict[str, Any] = {}
    top = kind_of(obj)
    if top is not None:
        facts["content"] = top
    elif any(t.role in ("param", "frozen", "buffer") for t in tensors):
        facts["content"] = "training_state" if found or any(t.role == "other" for t in tensors) else "model"
    else:
        facts["content"] = "training_state" if found else "other"
    for kind, path, value in found:
        if kind in facts:
            facts[kind]["count"] = facts[kind].get("count", 1) + 1
            continue
        facts[kind] = ({"path": path} if path else {}) | _FACTS[kind](value)
    return facts
