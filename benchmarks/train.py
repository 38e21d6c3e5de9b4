"""Training throughput: the online trainer against a plain PyTorch loop, and the MLP-only limit.

Run: ``.venv/bin/python benchmarks/train.py [--quick] [--breakdown]``. Both sides run on 2 threads
(``torch.set_num_threads(2)``) and train on the same decoded batches: Arrow record batches as
the samples log holds them, decoded once by :func:`minutely.data.record_batch_to_tensors`
before any timing, so decoding is excluded from both sides (its own rate is reported as
``decode_samples_per_s``).

* the trainer: :meth:`minutely.train.Trainer.train_step` on a model from
  :func:`minutely.model.build_model` (row-sparse Adam for the tables, Adam for the rest);
* the plain loop: the same architecture written plainly, one ``nn.EmbeddingBag(sparse=True)``
  per feature (column 0 the first-order weight, as in the trainer's tables), the rows stacked,
  ``torch.optim.SparseAdam`` for the tables and ``torch.optim.Adam`` for the rest, the same
  dimensions, loss (BCE) and learning rates;
* the MLP-only limit (large model): forward, backward and Adam of the DeepFM's MLP alone on a
  ``[batch, n_sparse * dim]`` input that needs no gradient: what a step costs with free lookups,
  interactions and table updates.

Two models: (a) the default :class:`~minutely.config.ModelConfig` on
:func:`~minutely.schema.default_schema`, trained on a simulated day
(:class:`minutely.sim.Market`, click labels) in batches of ``TrainConfig().batch_size``; (b) a
large DeepFM: 40 single-id sparse features, ``2**20`` rows per table (``2**18`` with
``--quick``), dimension 16, hidden ``(400, 400)``, batches of 4,096 with Zipf-distributed raw ids
(exponent 1.2: about a third of a batch's ids are distinct per feature). When both sides of a
model fit in memory together their steps alternate, with the MLP-only steps for the large model
(``order: "interleaved"``); otherwise each side is built, timed taking turns with MLP-only steps,
and freed, one after the other, ``rounds`` times (``"alternating rounds"``). Figures are medians
over the timed steps; ratios compare figures of the same run. ``fraction_of_mlp_only`` divides
the MLP-only step time measured alongside the trainer by the trainer's, and
``trainer_over_plain_vs_mlp_alongside`` compares each side's step time relative to the MLP-only
steps timed alongside it (equal to ``trainer_over_plain`` when the machine's speed did not
change between the sides). The machine's 1-minute
load average before and after the run is reported with them: other processes on the same cores
slow both sides, and not by the same factor. Prints a JSON object as its last line.

``--breakdown`` times nothing else but the parts of a large-model trainer step one by one (see
:func:`breakdown`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from minutely.config import ModelConfig, SimConfig, TrainConfig
from minutely.data import TensorBatch, arrow_schema, record_batch_to_tensors
from minutely.model import build_model
from minutely.model.lookup import gather_rows, interactions, plan_lookup
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.sim import Market
from minutely.sim.traffic import slice_features
from minutely.train import Trainer

THREADS = 2
GOAL_RATIO = 2.0
GOAL_MLP_FRACTION = 0.45
LARGE_FEATURES = 40
LARGE_DIM = 16
LARGE_HIDDEN = (400, 400)
LARGE_BATCH = 4096
ZIPF_A = 1.2

Step = Callable[[TensorBatch], float]


# --- data -------------------------------------------------------------------------------------


def simulated_record_batches(
    schema: Schema, impressions: int, batch_size: int
) -> list[pa.RecordBatch]:
    """One simulated day of impressions (label: clicked), as sample record batches."""
    market = Market(SimConfig(impressions_per_day=impressions, delay_preset="fast"), schema)
    day = market.simulate_day(0)
    out = []
    for lo in range(0, len(day) - batch_size + 1, batch_size):
        hi = lo + batch_size
        feats = slice_features(day.features, schema, lo, hi)
        ts = day.imp_ts_ms[lo:hi]
        label = day.clicked[lo:hi].astype(np.int8)
        columns: dict[str, Any] = {
            "sample_id": day.imp_id[lo:hi],
            "event_ts_ms": ts,
            "emit_ts_ms": ts,
            "label": label,
            "is_correction": np.zeros(batch_size, np.bool_),
            "label_ts_ms": np.where(label == 1, ts, -1),
        }
        for spec in schema.features:
            col = feats[spec.name]
            if spec.kind == "multi_sparse":
                values, offsets = col
                columns[spec.name] = pa.ListArray.from_arrays(
                    pa.array(offsets.astype(np.int32)), pa.array(values)
                )
            else:
                columns[spec.name] = col
        out.append(record_batch(columns, schema))
    return out


def zipf_record_batches(schema: Schema, n_batches: int, batch_size: int) -> list[pa.RecordBatch]:
    """Batches of Zipf-distributed raw ids (exponent :data:`ZIPF_A`), labels at a 3% rate."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n_batches):
        ids = np.arange(k * batch_size, (k + 1) * batch_size, dtype=np.int64)
        label = (rng.random(batch_size) < 0.03).astype(np.int8)
        columns: dict[str, Any] = {
            "sample_id": ids,
            "event_ts_ms": ids,
            "emit_ts_ms": ids,
            "label": label,
            "is_correction": np.zeros(batch_size, np.bool_),
            "label_ts_ms": np.where(label == 1, ids, -1),
        }
        for spec in schema.features:
            columns[spec.name] = rng.zipf(ZIPF_A, batch_size).astype(np.int64)
        out.append(record_batch(columns, schema))
    return out


def record_batch(columns: dict[str, Any], schema: Schema) -> pa.RecordBatch:
    target = arrow_schema(schema)
    arrays = [pa.array(columns[f.name], type=f.type) for f in target]
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def decode(
    batches: list[pa.RecordBatch], schema: Schema, buckets: int
) -> tuple[list[TensorBatch], float]:
    """The decoded batches and the decode rate in samples per second."""
    start = time.perf_counter()
    out = [record_batch_to_tensors(rb, schema, buckets) for rb in batches]
    elapsed = time.perf_counter() - start
    return out, sum(len(b) for b in out) / elapsed


# --- the plain loop ---------------------------------------------------------------------------


class PlainDeepFM(nn.Module):
    """DeepFM written plainly: first order + FM + MLP over per-feature embedding bags."""

    def __init__(self, cfg: ModelConfig, schema: Schema) -> None:
        super().__init__()
        self.names = [f.name for f in schema.sparse]
        dim = cfg.embedding_dim
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(
                cfg.buckets,
                1 + dim,
                mode="sum" if f.kind == "sparse" else "mean",
                sparse=True,
                include_last_offset=True,
            )
            for f in schema.sparse
        )
        with torch.no_grad():
            for bag in self.bags:
                bag.weight[:, 0].zero_()
                bag.weight[:, 1:].normal_(0.0, 0.01)
        n_dense = len(schema.dense)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dense_linear = nn.Linear(n_dense, 1, bias=False) if n_dense else None
        layers: list[nn.Module] = []
        width = len(self.names) * dim + n_dense
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1, bias=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, batch: TensorBatch) -> Tensor:
        rows = torch.stack(
            [
                bag(batch.sparse[name].values, batch.sparse[name].offsets)
                for name, bag in zip(self.names, self.bags, strict=True)
            ],
            1,
        )
        emb = rows[:, :, 1:]
        logit = self.bias + rows[:, :, 0].sum(1)
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(batch.dense).squeeze(1)
        total = emb.sum(1)
        fm = 0.5 * (total * total - (emb * emb).sum(1)).sum(1)
        deep = self.mlp(torch.cat([emb.flatten(1), batch.dense], 1)).squeeze(1)
        out: Tensor = logit + fm + deep
        return out


def plain_step(cfg: ModelConfig, schema: Schema, train: TrainConfig) -> Step:
    model = PlainDeepFM(cfg, schema)
    tables = [bag.weight for bag in model.bags]
    table_ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if id(p) not in table_ids]
    sparse = torch.optim.SparseAdam(tables, lr=train.embedding_lr)
    dense = torch.optim.Adam(rest, lr=train.lr)

    def step(batch: TensorBatch) -> float:
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        logits = model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        value = float(loss.detach())
        torch.sigmoid(logits.detach()).numpy()
        loss.backward()
        sparse.step()
        dense.step()
        return value

    return step


def trainer_step(cfg: ModelConfig, schema: Schema, train: TrainConfig) -> Step:
    trainer = Trainer(build_model(cfg, schema), train)
    return trainer.train_step


def mlp_only_step(cfg: ModelConfig, n_sparse: int, batch_size: int, train: TrainConfig) -> Step:
    """Forward, backward and Adam of the DeepFM's MLP alone, on an input needing no gradient."""
    layers: list[nn.Module] = []
    width = n_sparse * cfg.embedding_dim
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1, bias=False))
    mlp = nn.Sequential(*layers)
    opt = torch.optim.Adam(mlp.parameters(), lr=train.lr)
    x = torch.randn(batch_size, n_sparse * cfg.embedding_dim) * 0.01

    def step(batch: TensorBatch) -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(mlp(x).squeeze(1), batch.labels)
        value = float(loss.detach())
        loss.backward()
        opt.step()
        return value

    return step


# --- timing -----------------------------------------------------------------------------------


def time_interleaved(
    steps: dict[str, Step], batches: list[TensorBatch], n_steps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per step of each side, the sides taking turns on the same batches."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for k in range(warmup + n_steps):
        batch = batches[k % len(batches)]
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            if k >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def time_rounds(
    makers: dict[str, Callable[[], Step]],
    reference: Step,
    batches: list[TensorBatch],
    n_steps: int,
    warmup: int,
    rounds: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per step of each side, each built, timed and freed in turn, ``rounds`` times.

    ``reference`` (kept for the whole run) takes turns with whichever side is being timed;
    its times are returned per side too, so each side can be compared with work measured at
    the same moments.
    """
    times: dict[str, list[float]] = {name: [] for name in makers}
    paired: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            torch.manual_seed(0)
            step = make()
            got = time_interleaved({name: step, "reference": reference}, batches, n_steps, warmup)
            times[name] += got[name]
            paired[name] += got["reference"]
            del step, got
            gc.collect()
    return times, paired


def per_second(times: list[float], batch_size: int) -> float:
    return round(batch_size / statistics.median(times), 1)


def available_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def table_bytes(cfg: ModelConfig, n_sparse: int) -> int:
    """Weights plus the two Adam moments of every table."""
    return 3 * n_sparse * cfg.buckets * (1 + cfg.embedding_dim) * 4


# --- the two models ---------------------------------------------------------------------------


def default_model(quick: bool, train: TrainConfig) -> dict[str, Any]:
    schema = default_schema()
    cfg = ModelConfig()
    impressions = 60_000 if quick else 200_000
    records = simulated_record_batches(schema, impressions, train.batch_size)
    batches, decode_rate = decode(records, schema, cfg.buckets)
    n_steps, warmup = (60, 30) if quick else (300, 30)
    torch.manual_seed(0)
    steps = {
        "trainer": trainer_step(cfg, schema, train),
        "plain": plain_step(cfg, schema, train),
    }
    times = time_interleaved(steps, batches, n_steps, warmup)
    trainer = per_second(times["trainer"], train.batch_size)
    plain = per_second(times["plain"], train.batch_size)
    return {
        "model": "ModelConfig() on default_schema()",
        "arch": cfg.arch,
        "buckets": cfg.buckets,
        "embedding_dim": cfg.embedding_dim,
        "hidden": list(cfg.hidden),
        "batch_size": train.batch_size,
        "batches": len(batches),
        "timed_steps_per_side": n_steps,
        "order": "interleaved",
        "decode_samples_per_s": round(decode_rate, 1),
        "trainer_samples_per_s": trainer,
        "plain_samples_per_s": plain,
        "trainer_over_plain": round(trainer / plain, 3),
    }


def large_model(quick: bool, train: TrainConfig) -> dict[str, Any]:
    schema = Schema(tuple(FeatureSpec(f"f{i:02d}", "sparse") for i in range(LARGE_FEATURES)))
    buckets = 1 << (18 if quick else 20)
    cfg = ModelConfig(arch="deepfm", buckets=buckets, embedding_dim=LARGE_DIM, hidden=LARGE_HIDDEN)
    n_batches = 8
    records = zipf_record_batches(schema, n_batches, LARGE_BATCH)
    batches, decode_rate = decode(records, schema, buckets)
    distinct = statistics.median(
        float(b.sparse[name].values.unique().numel()) for b in batches for name in b.sparse
    )
    n_steps, warmup, rounds = (12, 3, 1) if quick else (20, 5, 3)
    both = 2 * table_bytes(cfg, LARGE_FEATURES)
    makers: dict[str, Callable[[], Step]] = {
        "trainer": lambda: trainer_step(cfg, schema, train),
        "plain": lambda: plain_step(cfg, schema, train),
    }
    torch.manual_seed(0)
    mlp_only = mlp_only_step(cfg, LARGE_FEATURES, LARGE_BATCH, train)
    if both < 0.5 * available_bytes():
        order = "interleaved"
        rounds = 1
        torch.manual_seed(0)
        steps = {name: make() for name, make in makers.items()}
        times = time_interleaved({**steps, "mlp_only": mlp_only}, batches, n_steps, warmup)
        paired = {name: times["mlp_only"] for name in makers}
        del steps
    else:
        order = "alternating rounds"
        times, paired = time_rounds(makers, mlp_only, batches, n_steps, warmup, rounds)
        times["mlp_only"] = paired["trainer"] + paired["plain"]
    gc.collect()
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = {name: statistics.median(t) for name, t in paired.items()}
    trainer = per_second(times["trainer"], LARGE_BATCH)
    plain = per_second(times["plain"], LARGE_BATCH)
    limit = per_second(times["mlp_only"], LARGE_BATCH)
    return {
        "sparse_features": LARGE_FEATURES,
        "buckets": buckets,
        "embedding_dim": LARGE_DIM,
        "hidden": list(LARGE_HIDDEN),
        "batch_size": LARGE_BATCH,
        "zipf_exponent": ZIPF_A,
        "distinct_ids_per_feature_per_batch_median": distinct,
        "timed_steps_per_side": n_steps * rounds,
        "order": order,
        "rounds": rounds,
        "decode_samples_per_s": round(decode_rate, 1),
        "trainer_samples_per_s": trainer,
        "plain_samples_per_s": plain,
        "mlp_only_samples_per_s": limit,
        "trainer_over_plain": round(trainer / plain, 3),
        # Each side against the MLP-only steps timed alongside it: the machine's speed at
        # those moments cancels out.
        "trainer_over_plain_vs_mlp_alongside": round(
            (med["plain"] / ref["plain"]) / (med["trainer"] / ref["trainer"]), 3
        ),
        "fraction_of_mlp_only": round(ref["trainer"] / med["trainer"], 3),
        "trainer_step_ms_median": round(1e3 * med["trainer"], 2),
        "plain_step_ms_median": round(1e3 * med["plain"], 2),
        "mlp_only_step_ms_median": round(1e3 * med["mlp_only"], 2),
        "mlp_only_step_ms_median_alongside_trainer": round(1e3 * ref["trainer"], 2),
        "mlp_only_step_ms_median_alongside_plain": round(1e3 * ref["plain"], 2),
    }


def breakdown(quick: bool, train: TrainConfig) -> dict[str, Any]:
    """Median milliseconds of each part of a large-model trainer step, timed one by one.

    The step is the trainer's (same model, loss and optimizers), run part by part: the lookup
    plan, the table reads, the interactions, the MLP and loss, the backward pass (with the
    interactions' and table reads' shares of it from torch.profiler, on separate steps) and
    the two optimizers.
    """
    schema = Schema(tuple(FeatureSpec(f"f{i:02d}", "sparse") for i in range(LARGE_FEATURES)))
    buckets = 1 << (18 if quick else 20)
    cfg = ModelConfig(arch="deepfm", buckets=buckets, embedding_dim=LARGE_DIM, hidden=LARGE_HIDDEN)
    batches, _ = decode(zipf_record_batches(schema, 8, LARGE_BATCH), schema, buckets)
    torch.manual_seed(0)
    trainer = Trainer(build_model(cfg, schema), train)
    model, sparse, dense = trainer.model, trainer.optimizers["sparse"], trainer.optimizers["dense"]
    tables = [cast(Tensor, model.embeddings[n].weight) for n in model.sparse_names]
    sum_pooled = [f.kind == "sparse" for f in schema.sparse]
    parts: dict[str, list[float]] = {}
    n_steps, warmup, profiled = (10, 3, 3) if quick else (30, 5, 5)
    for k in range(warmup + n_steps + profiled):
        batch = batches[k % len(batches)]
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        marks = [time.perf_counter()]
        jags = [batch.sparse[n] for n in model.sparse_names]
        plan = plan_lookup(
            [j.values for j in jags], [j.offsets for j in jags], sum_pooled, buckets, len(batch)
        )
        marks.append(time.perf_counter())
        rows = gather_rows(plan, tables)
        marks.append(time.perf_counter())
        first, fm, emb = interactions(rows, plan)
        marks.append(time.perf_counter())
        regular, hourly = model.dense_parts(batch)
        mlp = cast(nn.Module, model.mlp)
        logits = model.first_order_logit(first.view(-1, 1, 1), regular, hourly) + fm
        logits = logits + mlp(emb, regular, hourly)
        loss = trainer.loss(logits, batch)
        float(loss.detach())
        model.probabilities(logits.detach()).numpy()
        marks.append(time.perf_counter())
        if k >= warmup + n_steps:
            with torch.profiler.profile() as prof:
                loss.backward()
            totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
            for key in ("InteractionsBackward", "GatherRowsBackward"):
                parts.setdefault(f"backward_{key}_profiled", []).append(totals.get(key, 0.0))
            continue
        loss.backward()
        marks.append(time.perf_counter())
        sparse.step()
        marks.append(time.perf_counter())
        dense.step()
        marks.append(time.perf_counter())
        if k < warmup:
            continue
        names = ("plan", "table_reads", "interactions", "mlp_and_loss", "backward")
        names = (*names, "sparse_adam", "dense_adam")
        for name, a, b in zip(names, marks[:-1], marks[1:], strict=True):
            parts.setdefault(name, []).append(1e3 * (b - a))
        parts.setdefault("step", []).append(1e3 * (marks[-1] - marks[0]))
    return {
        "buckets": buckets,
        "steps": n_steps,
        "median_ms": {k: round(statistics.median(v), 2) for k, v in parts.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps, 2**18 rows per large table"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="only time the parts of a large-model trainer step",
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]
    train = TrainConfig()
    if args.breakdown:
        parts = breakdown(args.quick, train)
        parts["load_average_1min_before_after"] = [
            round(load_before, 2),
            round(os.getloadavg()[0], 2),
        ]
        print(json.dumps(parts))
        return
    default = default_model(args.quick, train)
    print(json.dumps({"default": default}), file=sys.stderr)
    large = large_model(args.quick, train)
    result = {
        "quick": args.quick,
        "threads": THREADS,
        "decode": "excluded from both sides (batches decoded once before timing)",
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "default_trainer_samples_per_s": default["trainer_samples_per_s"],
        "default_plain_samples_per_s": default["plain_samples_per_s"],
        "default_trainer_over_plain": default["trainer_over_plain"],
        "large_trainer_samples_per_s": large["trainer_samples_per_s"],
        "large_plain_samples_per_s": large["plain_samples_per_s"],
        "large_mlp_only_samples_per_s": large["mlp_only_samples_per_s"],
        "large_trainer_over_plain": large["trainer_over_plain"],
        "large_fraction_of_mlp_only": large["fraction_of_mlp_only"],
        "goals": {
            "trainer_over_plain": GOAL_RATIO,
            "fraction_of_mlp_only": GOAL_MLP_FRACTION,
            "default_ratio_met": default["trainer_over_plain"] >= GOAL_RATIO,
            "large_ratio_met": large["trainer_over_plain"] >= GOAL_RATIO,
            "large_mlp_fraction_met": large["fraction_of_mlp_only"] >= GOAL_MLP_FRACTION,
        },
        "default": default,
        "large": large,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
