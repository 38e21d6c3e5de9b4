"""The model contract: :class:`CtrModel`, its parameter names, flat state dicts, groups.

Parameter names are the key set of exported safetensors files, so they are part of the artifact
contract and stay stable. Every architecture uses the same names for the same roles:

=================================  =========================================================
name                               role
=================================  =========================================================
``bias``                           ``[1]`` global bias of the logit
``embeddings.<feature>.weight``    ``[buckets, 1 + embedding_dim]`` the one table of a sparse
                                   feature: column 0 is the first-order weight of each id,
                                   columns ``1:`` its embedding (deepfm; an lr table has
                                   column 0 only)
``dense_linear.weight``            ``[1, n]`` first-order weights of the dense features that
                                   are not hour-level (schema order)
``hour_dense_linear.weight``       ``[1, n]`` first-order weights of hour-level dense features
``mlp.from_embeddings.weight``     ``[hidden[0], n_sparse * dim]`` and ``.bias``: first MLP
                                   layer, the columns fed by the concatenated embeddings
``mlp.from_dense.weight``          ``[hidden[0], n]`` first MLP layer, non-hour-level dense
``mlp.from_hour_dense.weight``     ``[hidden[0], n]`` first MLP layer, hour-level dense
``mlp.hidden.<i>.weight``          and ``.bias``: MLP layer ``i + 1`` (``hidden[i + 1]`` rows)
``mlp.out.weight``                 ``[1, hidden[-1]]`` MLP output (its bias is ``bias``)
=================================  =========================================================

The first-order weight of an id shares its table row with the id's embedding: one lookup and one
optimizer update per feature instead of two, which is most of the cost of a training step.
A module whose input would be empty (no hour-level dense feature, say) does not exist, and so
has no key. The first MLP layer is three linear maps that are summed: the same function as one
layer over ``[embeddings, dense, hour_dense]``, but the columns that read hour-level features
are parameters of their own, so hour-level features can be frozen (or taken from another model)
by name: see :func:`model_groups`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from minutely.config import ModelConfig
from minutely.data.tensors import TensorBatch
from minutely.errors import SchemaError, SchemaMismatchError
from minutely.model.lookup import (
    FeatureInputError,
    LookupPlan,
    direct_plan,
    gather_rows,
    plan_lookup,
)
from minutely.schema import Schema

HOUR_LEVEL = "hour_level"
OTHER = "other"

# Modules whose parameters read hour-level dense features only.
_HOUR_DENSE_MODULES = ("hour_dense_linear.", "mlp.from_hour_dense.")
# The ModuleDict of per-feature tables: ``embeddings.<feature>.weight``.
_TABLES = "embeddings"
EMBEDDING_STD = 0.01


def make_tables(schema: Schema, buckets: int, embedding_dim: int) -> nn.ModuleDict:
    """One ``nn.EmbeddingBag`` of width ``1 + embedding_dim`` per sparse feature.

    Column 0 (first-order weights) starts at zero, the embedding columns ``N(0, 0.01)``.
    ``sum`` pools a single-id feature (one id per row, so the sum is the embedding) and ``mean``
    pools a list (its length then does not scale the logit). Gradients are sparse: only the rows
    a batch touches are updated, which is what keeps a step cheap with large tables. The models
    read the tables through :meth:`CtrModel.lookup_rows`, which pools as these modules do but
    reads each distinct id of a batch once.
    """
    tables = nn.ModuleDict()
    for spec in schema.sparse:
        bag = nn.EmbeddingBag(
            buckets,
            1 + embedding_dim,
            mode="sum" if spec.kind == "sparse" else "mean",
            sparse=True,
            include_last_offset=True,
        )
        with torch.no_grad():
            bag.weight[:, 0].zero_()
            bag.weight[:, 1:].normal_(0.0, EMBEDDING_STD)
        tables[spec.name] = bag
    return tables


def optional_linear(n_in: int, n_out: int, *, bias: bool, zero: bool = False) -> nn.Linear | None:
    """A linear map, or ``None`` when it would have no input (no parameter, no key)."""
    if n_in == 0:
        return None
    layer = nn.Linear(n_in, n_out, bias=bias)
    if zero:
        with torch.no_grad():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    return layer


def fnc_calibrate(biased: Tensor) -> Tensor:
    """Fake negative calibration: ``p = b / (1 - b)``, clipped to ``[0, 1]``.

    ``b`` is a probability learned by plain BCE from the stream in which every sample first goes
    out as a negative and, when its action comes, once more as a positive: a sample with true
    rate ``p`` is positive in ``p / (1 + p)`` of its rows, and ``b / (1 - b)`` inverts that.
    ``b > 1/2`` stands for a rate above 1, which no true rate reaches, and is clipped to 1 (as is
    ``b = 1``); the result is always a valid probability (``nan`` stays ``nan``).

    >>> fnc_calibrate(torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])).tolist()
    [0.0, 0.25, 1.0, 1.0, 1.0]
    """
    return (biased / (1.0 - biased)).clamp(0.0, 1.0)


def fnc_probability(logits: Tensor) -> Tensor:
    """:func:`fnc_calibrate` of ``sigmoid(logits)``, computed as ``exp(min(logits, 0))``.

    With ``b = sigmoid(z)``, ``b / (1 - b) = exp(z)`` exactly, so the calibrated probability is
    taken from the logit directly: no rounding of ``b`` near 0 or 1 enters it, and the clip at
    1 is the clip of ``z`` at 0.

    >>> fnc_probability(torch.tensor([-1e9, 0.0, 3.0])).tolist()
    [0.0, 1.0, 1.0]
    """
    return torch.exp(logits.clamp(max=0.0))


class CtrModel(nn.Module):
    """Base of every click/conversion model: a batch in, one logit per row out.

    The tables, ``bias``, ``dense_linear`` and ``hour_dense_linear`` are shared by every
    architecture and built here; a subclass adds its modules after
    ``super().__init__(cfg, schema, embedding_dim)`` and implements :meth:`logits` from
    :meth:`lookup`, :meth:`dense_parts` and :meth:`first_order_logit`.

    ``forward`` is the same in train and eval mode (no dropout, no batch norm), which lets the
    trainer score a batch and train on it from one forward pass.
    """

    arch: ClassVar[str]
    regular_cols: Tensor  # dense column indices that are not hour-level
    hour_cols: Tensor  # dense column indices that are hour-level

    def __init__(self, cfg: ModelConfig, schema: Schema, embedding_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.schema = schema
        self.sparse_names = tuple(f.name for f in schema.sparse)
        dense = schema.dense
        regular = [i for i, f in enumerate(dense) if not f.hour_level]
        hourly = [i for i, f in enumerate(dense) if f.hour_level]
        self.n_dense = len(dense)
        # Not persistent: column indices follow from the schema and are no artifact key. On the
        # CPU even when the model is built on the meta device (see model.artifact), where no
        # load would fill them.
        cpu = torch.device("cpu")
        self.register_buffer(
            "regular_cols", torch.tensor(regular, dtype=torch.long, device=cpu), False
        )
        self.register_buffer("hour_cols", torch.tensor(hourly, dtype=torch.long, device=cpu), False)

        self.bias = nn.Parameter(torch.zeros(1))
        self.table_width = 1 + embedding_dim
        self.embeddings = make_tables(schema, cfg.buckets, embedding_dim)
        self.dense_linear = optional_linear(len(regular), 1, bias=False, zero=True)
        self.hour_dense_linear = optional_linear(len(hourly), 1, bias=False, zero=True)

    # -- forward --------------------------------------------------------------------------

    def forward(self, batch: TensorBatch) -> Tensor:
        """Logits ``[B]`` (float32) of the rows of ``batch``."""
        self.check_batch(batch)
        return self.logits(batch)

    def logits(self, batch: TensorBatch) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: TensorBatch) -> Tensor:
        """Probabilities ``[B]`` (:meth:`probabilities` of the logits), without autograd."""
        return self.probabilities(self.forward(batch))

    def probabilities(self, logits: Tensor) -> Tensor:
        """The probabilities this model stands for, from its logits, by ``cfg.loss``.

        ``sigmoid(logits)`` for every loss but ``"fnc"``, whose logits are those of the biased
        stream: for it, :func:`fnc_probability` (the calibrated ``b / (1 - b)``). Training,
        scoring and serving all map logits through here.
        """
        if self.cfg.loss == "fnc":
            return fnc_probability(logits)
        return torch.sigmoid(logits)

    def check_batch(self, batch: TensorBatch) -> None:
        """Raise :class:`SchemaError` if ``batch`` lacks a feature or has the wrong dense width."""
        missing = [n for n in self.sparse_names if n not in batch.sparse]
        if missing:
            raise SchemaError(
                f"{self.arch} model: batch lacks sparse features {missing}; "
                f"got {sorted(batch.sparse)}"
            )
        shape = tuple(batch.dense.shape)
        if len(shape) != 2 or shape[1] != self.n_dense or shape[0] != len(batch):
            raise SchemaError(
                f"{self.arch} model: expected dense of shape [{len(batch)}, {self.n_dense}], "
                f"got {list(shape)}"
            )

    def lookup(self, batch: TensorBatch) -> Tensor:
        """Every sparse feature's pooled table row: ``[B, n_sparse, 1 + embedding_dim]``."""
        rows, plan = self.lookup_rows(batch)
        n, n_features = plan.index.shape
        return rows.index_select(0, plan.index.view(-1)).view(n, n_features, self.table_width)

    def lookup_rows(self, batch: TensorBatch) -> tuple[Tensor, LookupPlan]:
        """The pooled rows of a batch, each distinct one once: ``(rows [R, 1 + dim], plan)``.

        ``plan.index[b, f]`` is the row of ``rows`` holding sparse feature ``f``'s pooled table
        row for batch row ``b`` (column 0 the first-order weight, ``1:`` the embedding): a
        single-id feature's table row (``sum`` of one id), or a list's ``mean`` (zeros for an
        empty list), as the tables' ``nn.EmbeddingBag`` modules pool. Each distinct id of a
        batch is read once (:mod:`minutely.model.lookup`), so each table's sparse gradient
        holds each touched row once, in increasing order. Raises :class:`SchemaError` naming
        the feature for an id outside ``[0, buckets)`` or offsets that do not fit the batch.
        """
        n = len(batch)
        names = self.sparse_names
        jags = [batch.sparse[name] for name in names]
        tables = [cast(Tensor, self.embeddings[name].weight) for name in names]
        on_cpu = all(t.device.type == "cpu" for t in tables) and all(
            j.values.device.type == "cpu" and j.offsets.device.type == "cpu" for j in jags
        )
        if not on_cpu or n == 0 or not names:
            plan = direct_plan(n, len(names), batch.dense.device)
            if not names:
                return batch.dense.new_zeros(0, self.table_width), plan
            pooled = torch.stack([self._pool(name, batch) for name in names], 1)
            return pooled.view(n * len(names), self.table_width), plan
        try:
            plan = plan_lookup(
                [j.values for j in jags],
                [j.offsets for j in jags],
                self._sum_pooled,
                self.cfg.buckets,
                n,
            )
        except FeatureInputError as exc:
            raise self._lookup_error(names[exc.position], batch, str(exc)) from exc
        rows = gather_rows(plan, tables)
        if not plan.bags:
            return rows, plan
        parts = [rows]
        for bag in plan.bags:
            try:
                parts.append(
                    F.embedding_bag(
                        bag.rows, rows, bag.offsets, mode=bag.mode, include_last_offset=True
                    )
                )
            except (IndexError, RuntimeError) as exc:
                raise self._lookup_error(names[bag.position], batch, str(exc)) from exc
        return torch.cat(parts), plan

    @property
    def _sum_pooled(self) -> list[bool]:
        return [f.kind == "sparse" for f in self.schema.sparse]

    def _lookup_error(self, name: str, batch: TensorBatch, detail: str) -> SchemaError:
        jag = batch.sparse[name]
        v = jag.values
        got = f"ids in [{int(v.min())}, {int(v.max())}]" if v.numel() else "no ids"
        return SchemaError(
            f"feature {name!r}: expected ids in [0, {self.cfg.buckets}) and "
            f"{len(batch) + 1} offsets, got {got} and {jag.offsets.numel()} offsets ({detail})"
        )

    def _pool(self, name: str, batch: TensorBatch) -> Tensor:
        jag = batch.sparse[name]
        try:
            out: Tensor = self.embeddings[name](jag.values, jag.offsets)
        except (IndexError, RuntimeError) as exc:
            raise self._lookup_error(name, batch, str(exc)) from exc
        return out

    def dense_parts(self, batch: TensorBatch) -> tuple[Tensor, Tensor]:
        """The dense columns split into (not hour-level, hour-level), schema order in each."""
        dense = batch.dense
        return dense.index_select(1, self.regular_cols), dense.index_select(1, self.hour_cols)

    def first_order_logit(self, rows: Tensor, regular: Tensor, hourly: Tensor) -> Tensor:
        """``bias + sum of first-order id weights + dense linear terms``: ``[B]``.

        ``rows`` is :meth:`lookup`'s output; ``regular, hourly`` are :meth:`dense_parts`'.
        """
        out = self.bias + rows[:, :, 0].sum(1)
        if self.dense_linear is not None:
            out = out + self.dense_linear(regular).squeeze(1)
        if self.hour_dense_linear is not None:
            out = out + self.hour_dense_linear(hourly).squeeze(1)
        return out

    # -- parameters -----------------------------------------------------------------------

    def embedding_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The embedding-bag tables (sparse gradients), by name, in registration order."""
        return [(n, p) for n, p in self.named_parameters() if _is_table(n)]

    def dense_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every other parameter (dense gradients), by name, in registration order."""
        return [(n, p) for n, p in self.named_parameters() if not _is_table(n)]

    def flat_state_dict(self) -> dict[str, Tensor]:
        """Parameters by name (detached, contiguous, CPU): what a safetensors file holds."""
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters()}

    def check_flat_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Raise :class:`SchemaMismatchError` unless ``tensors`` fits this model exactly."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise SchemaMismatchError(
                f"{self.arch} model weights: expected exactly the model's keys; "
                f"missing {missing}, unexpected {unexpected}"
            )
        for name, param in own.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(param.shape):
                raise SchemaMismatchError(
                    f"{self.arch} model weights: key {name!r}: expected shape "
                    f"{list(param.shape)}, got {list(t.shape)}"
                )
            if t.dtype != param.dtype:
                raise SchemaMismatchError(
                    f"{self.arch} model weights: key {name!r}: expected dtype {param.dtype}, "
                    f"got {t.dtype}"
                )

    def load_flat_state_dict(self, tensors: Mapping[str, Tensor], *, assign: bool = False) -> None:
        """Copy ``tensors`` into the parameters after :meth:`check_flat_state_dict`.

        With ``assign`` the parameters become ``tensors`` themselves (no copy: the model then
        shares their memory), which is how a model built on the meta device gets its weights.
        Nothing is modified when the check fails.
        """
        self.check_flat_state_dict(tensors)
        if assign:
            self.load_state_dict(dict(tensors), strict=True, assign=True)
            return
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(tensors[name])


def _is_table(name: str) -> bool:
    return name.split(".", 1)[0] == _TABLES


def model_groups(model: CtrModel) -> dict[str, list[str]]:
    """Parameter names by group: ``"hour_level"`` and ``"other"`` (every name in exactly one).

    ``"hour_level"`` holds every parameter that reads only hour-level features: the table of an
    hour-level sparse feature (``embeddings.<f>.weight``) and the
    modules fed by the hour-level dense columns (``hour_dense_linear.*``,
    ``mlp.from_hour_dense.*``). Online training keeps this group frozen at the day model's
    values.

    >>> from minutely.config import ModelConfig
    >>> from minutely.model import build_model
    >>> from minutely.schema import default_schema
    >>> m = build_model(ModelConfig(buckets=16, embedding_dim=2, hidden=(4,)), default_schema())
    >>> model_groups(m)["hour_level"]
    ['hour_dense_linear.weight', 'mlp.from_hour_dense.weight']
    """
    hour_sparse = {f.name for f in model.schema.sparse if f.hour_level}
    groups: dict[str, list[str]] = {HOUR_LEVEL: [], OTHER: []}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        hourly = name.startswith(_HOUR_DENSE_MODULES) or (
            parts[0] == _TABLES and parts[1] in hour_sparse
        )
        groups[HOUR_LEVEL if hourly else OTHER].append(name)
    return groups
