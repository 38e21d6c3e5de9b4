"""A trainer's learned state by parameter name, and its bytes.

A :class:`TrainingState` holds what a trainer has learned: every parameter's weights and the
optimizer state of every parameter that has any (Adam's and SparseAdam's ``step``,
``exp_avg`` and ``exp_avg_sq``), keyed by parameter name rather than by position in an
optimizer. Names make it portable between trainers of the same model whose optimizers hold
different parameter lists (one with hour-level parameters frozen, one without), and they make
it checkable: :meth:`~minutely.train.Trainer.load_state` refuses a state that does not fit.
A state also records the model it came from (architecture, schema fingerprint, loss), so a
state of another model is refused by name, not by an accident of shapes.

:meth:`TrainingState.to_bytes` writes one safetensors file: tensors under
``weights/<param>`` and ``optimizer/<param>/<key>``; the model description and the
optimizer's plain-number state (SparseAdam's integer ``step``) go in the file's metadata as
JSON. Reading it back never unpickles anything.

>>> import torch
>>> state = TrainingState(
...     arch="lr", schema_fingerprint="0123456789abcdef", loss="bce",
...     weights={"bias": torch.zeros(1)},
...     optimizer={"bias": {"step": torch.tensor(2.0), "exp_avg": torch.ones(1),
...                         "exp_avg_sq": torch.ones(1)}},
... )
>>> back = TrainingState.from_bytes(state.to_bytes())
>>> back.arch, sorted(back.optimizer["bias"]), float(back.optimizer["bias"]["step"])
('lr', ['exp_avg', 'exp_avg_sq', 'step'], 2.0)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from minutely.errors import CheckpointError

FORMAT = 1
_META_KEY = "minutely.training_state"
_WEIGHTS = "weights/"
_OPTIMIZER = "optimizer/"

StateValue = Tensor | int | float
"""One entry of a parameter's optimizer state: a tensor (moments, Adam's step) or a number."""


def logit_space(loss: str) -> str:
    """What a model's logits stand for under ``loss``: ``"biased"`` for ``fnc``, else ``"true"``.

    An ``fnc`` model's logits are those of the stream with fake negatives (calibrated only when
    turned into probabilities); every other loss learns logits of the true rate. Weights,
    optimizer state and distillation targets move only between models of one space.

    >>> logit_space("fnc"), logit_space("pu")
    ('biased', 'true')
    """
    return "biased" if loss == "fnc" else "true"


@dataclass(frozen=True, eq=False)
class TrainingState:
    """Weights and per-parameter optimizer state of one model, by parameter name.

    ``weights`` maps every parameter name to its tensor; ``optimizer`` maps the name of every
    parameter that has optimizer state to that state (``step``, ``exp_avg``, ``exp_avg_sq``).
    The trainer's counters are not part of it: they count what one trainer did.
    ``arch``, ``schema_fingerprint`` and ``loss`` describe the model the state belongs to.
    """

    arch: str
    schema_fingerprint: str
    loss: str
    weights: Mapping[str, Tensor]
    optimizer: Mapping[str, Mapping[str, StateValue]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """One safetensors file (see the module docstring); :meth:`from_bytes` reads it back.

        Raises ``ValueError`` for a name containing ``/`` in a state key, or a state value that
        is neither a tensor nor a number.
        """
        tensors: dict[str, Tensor] = {
            _WEIGHTS + name: t.detach().cpu().contiguous() for name, t in self.weights.items()
        }
        numbers: dict[str, dict[str, int | float]] = {}
        for name, per_param in self.optimizer.items():
            for key, value in per_param.items():
                if "/" in key:
                    raise ValueError(
                        f"training state of {name!r}: expected state keys without '/', got {key!r}"
                    )
                if isinstance(value, Tensor):
                    tensors[f"{_OPTIMIZER}{name}/{key}"] = value.detach().cpu().contiguous()
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    numbers.setdefault(name, {})[key] = value
                else:
                    raise ValueError(
                        f"training state of {name!r} {key!r}: expected a tensor or a number, "
                        f"got {type(value).__name__}"
                    )
        meta = {
            "format": FORMAT,
            "arch": self.arch,
            "schema_fingerprint": self.schema_fingerprint,
            "loss": self.loss,
            "numbers": numbers,
        }
        return safetensors.torch.save(tensors, metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingState:
        """The state :meth:`to_bytes` wrote; :class:`CheckpointError` for anything else.

        Checks the layout only (format, fields, names); whether the state fits a model is
        :meth:`~minutely.train.Trainer.load_state`'s check.
        """
        meta = _metadata(data)
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:
            raise CheckpointError(f"training state: unreadable tensors ({exc})") from exc
        weights: dict[str, Tensor] = {}
        optimizer: dict[str, dict[str, StateValue]] = {}
        for key, tensor in tensors.items():
            if key.startswith(_WEIGHTS):
                weights[key[len(_WEIGHTS) :]] = tensor
            elif key.startswith(_OPTIMIZER) and "/" in key[len(_OPTIMIZER) :]:
                name, state_key = key[len(_OPTIMIZER) :].rsplit("/", 1)
                optimizer.setdefault(name, {})[state_key] = tensor
            else:
                raise CheckpointError(
                    f"training state: expected tensors named '{_WEIGHTS}<param>' or "
                    f"'{_OPTIMIZER}<param>/<key>', got {key!r}"
                )
        for name, per_param in meta["numbers"].items():
            for state_key, value in per_param.items():
                optimizer.setdefault(name, {})[state_key] = value
        return cls(
            arch=meta["arch"],
            schema_fingerprint=meta["schema_fingerprint"],
            loss=meta["loss"],
            weights=weights,
            optimizer=optimizer,
        )


def _metadata(data: bytes) -> dict[str, Any]:
    """The checked JSON metadata of a safetensors file written by :meth:`to_bytes`."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except Exception as exc:
        raise CheckpointError(
            f"training state: expected a safetensors file with {_META_KEY!r} metadata, got "
            f"{len(data)} bytes that are not one ({type(exc).__name__}: {exc})"
        ) from exc
    ok = (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and all(isinstance(meta.get(k), str) for k in ("arch", "schema_fingerprint", "loss"))
        and isinstance(meta.get("numbers"), dict)
        and all(
            isinstance(per_param, dict)
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in per_param.values()
            )
            for per_param in meta["numbers"].values()
        )
    )
    if not ok:
        raise CheckpointError(
            f"training state: expected metadata of format {FORMAT} with 'arch', "
            f"'schema_fingerprint', 'loss' (strings) and 'numbers' (numbers by parameter), "
            f"got {meta!r}"
        )
    checked: dict[str, Any] = meta
    return checked


def copy_value(value: Any) -> StateValue:
    """A deep copy of one optimizer state entry; ``TypeError`` unless a tensor or a number."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise TypeError(
        f"optimizer state: expected tensors and numbers, got {type(value).__name__}: {value!r}"
    )


def check_step(value: StateValue) -> float:
    """The value of a ``step`` entry; ``ValueError`` unless a non-negative whole number."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise ValueError(f"expected a scalar step, got a tensor of shape {list(value.shape)}")
        number = float(value)
    else:
        number = float(value)
    if not (number >= 0 and number == int(number)):
        raise ValueError(f"expected a whole step >= 0, got {number}")
    return number


def as_dense_step(value: StateValue) -> Tensor:
    """``step`` as ``torch.optim.Adam`` keeps it: a scalar tensor (a fresh copy; a number
    becomes float32, Adam's own type for it)."""
    number = check_step(value)
    if isinstance(value, Tensor):
        return value.detach().clone()
    return torch.tensor(number, dtype=torch.float32)


def as_sparse_step(value: StateValue) -> int:
    """``step`` as ``SparseAdam`` keeps it: a Python ``int``."""
    return int(check_step(value))
