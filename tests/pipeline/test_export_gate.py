"""The export gate: the verdict's rules and the gated export with real models and batches."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minutely.config import ExportConfig, LossName, ModelConfig
from minutely.data.tensors import TensorBatch
from minutely.model import CtrModel, build_model
from minutely.model.synthetic import synthetic_batch
from minutely.pipeline.export import Exporter, ExportState, judge
from minutely.registry import Registry
from minutely.schema import default_schema

MIN = 60_000
SCHEMA = default_schema()
GATE = ExportConfig(
    every_min=10,
    min_samples=0,
    min_trained_min=0,
    gate_max_auc_drop=0.02,
    gate_pcoc_min=0.75,
    gate_pcoc_max=1.33,
    gate_min_positives=20,
)


def scores(n: int, seed: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions in [0, 1] whose ranking follows the labels by ``signal``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float64)
    logit = -0.5 + signal * (2 * y - 1) + rng.normal(0, 1, n)
    return 1 / (1 + np.exp(-logit)), y


def calibrate(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``p`` scaled to PCOC 1 (the scores above predict more than the labels hold)."""
    factor = float(y.sum() / p.sum())
    assert factor <= 1
    return p * factor


# -- the rules ----------------------------------------------------------------------------------


def test_a_candidate_as_good_as_the_live_version_passes_with_its_numbers() -> None:
    p, y = scores(2_000, 0, 1.0)
    cand = calibrate(p, y)
    v = judge(GATE, cand, cand, y)
    assert v.passed
    assert (v.n, v.positives) == (2_000, int(y.sum()))
    assert v.auc == v.live_auc > 0.7
    assert v.pcoc == pytest.approx(1.0)
    assert v.reason.startswith("passed: PCOC 1 in [0.75, 1.33]; AUC ")
    assert v.reason.endswith(f"(n=2000, positives={int(y.sum())})")


def test_an_auc_drop_beyond_the_allowance_is_refused_naming_both_aucs() -> None:
    good, y = scores(2_000, 1, 1.0)
    rng = np.random.default_rng(3)
    weak = 1 / (1 + np.exp(-(-0.5 + 0.2 * (2 * y - 1) + rng.normal(0, 1, y.size))))
    v = judge(GATE, calibrate(weak, y), calibrate(good, y), y)
    assert not v.passed
    assert v.auc < v.live_auc - 0.02
    assert v.reason.startswith(f"refused: AUC {v.auc:.4f} < live AUC {v.live_auc:.4f} - 0.02")


def test_an_auc_drop_within_the_allowance_passes() -> None:
    p, y = scores(4_000, 4, 1.0)
    live = calibrate(p, y)
    # Swap a few positive/negative scores: a small, known drop in AUC.
    cand = live.copy()
    pos, neg = np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 0)[:10]
    cand[pos], cand[neg] = live[neg], live[pos]
    v = judge(GATE, cand, live, y)
    assert 0 < v.live_auc - v.auc <= 0.02
    assert v.passed, v.reason


def test_pcoc_outside_the_range_is_refused_either_way() -> None:
    p, y = scores(2_000, 5, 1.0)
    cal = calibrate(p, y)
    high = judge(GATE, np.clip(cal * 1.5, 0, 1), cal, y)
    assert not high.passed
    assert f"PCOC {high.pcoc:.4g} outside [0.75, 1.33]" in high.reason
    low = judge(GATE, cal * 0.5, cal, y)
    assert not low.passed
    assert low.pcoc == pytest.approx(0.5)
    assert "PCOC 0.5 outside [0.75, 1.33]" in low.reason


def test_without_a_live_version_only_pcoc_is_judged() -> None:
    p, y = scores(2_000, 6, 1.0)
    anti = calibrate(1 - p, y)  # a reversed ranking, calibrated
    v = judge(GATE, anti, None, y)
    assert v.passed
    assert v.auc < 0.4
    assert math.isnan(v.live_auc)
    assert "AUC not judged: no live version" in v.reason


def test_too_few_positives_or_negatives_do_not_judge_auc() -> None:
    y = np.array([1.0] * 5 + [0.0] * 95)
    live = np.where(y == 1, 0.5, 0.05)
    anti = np.where(y == 1, 0.05, 0.06)  # AUC 0, PCOC about 1.2
    v = judge(GATE, anti, live, y)
    assert v.passed, v.reason
    assert v.auc == 0.0
    assert "AUC not judged: 5 positives and 95 negatives, needs 20 of each" in v.reason
    y2 = 1 - y  # 95 positives, 5 negatives
    v2 = judge(GATE, np.full(100, 0.95), np.where(y2 == 1, 0.9, 0.2), y2)
    assert "AUC not judged: 95 positives and 5 negatives, needs 20 of each" in v2.reason


def test_without_a_positive_pcoc_is_not_judged() -> None:
    y = np.zeros(50)
    v = judge(GATE, np.full(50, 0.9), None, y)
    assert v.passed
    assert math.isnan(v.pcoc)
    assert "PCOC not judged: 0 positives, needs 20" in v.reason
    assert v.metrics() == {"gate_n": 50.0, "gate_positives": 0.0, "gate_logloss": v.logloss}


def test_verdict_metrics_name_every_finite_number() -> None:
    p, y = scores(500, 7, 1.0)
    v = judge(GATE, p, p, y)
    assert v.metrics() == {
        "gate_n": 500.0,
        "gate_positives": float(y.sum()),
        "gate_auc": v.auc,
        "gate_pcoc": v.pcoc,
        "gate_logloss": v.logloss,
        "gate_live_auc": v.live_auc,
        "gate_live_pcoc": v.live_pcoc,
        "gate_live_logloss": v.live_logloss,
    }


@pytest.mark.parametrize(
    ("cand", "live", "labels", "message"),
    [
        (
            [0.1, 0.2],
            None,
            [0, 1, 1],
            "candidate: expected predictions and labels of one length, got 2 and 3",
        ),
        ([0.1, 1.2], None, [0, 1], r"candidate: expected predictions in \[0, 1\], got \[1.2\]"),
        ([0.1, float("nan")], None, [0, 1], r"expected predictions in \[0, 1\], got \[nan\]"),
        ([0.1, 0.2], None, [0, 2], r"candidate: expected labels 0 or 1, got \[2.0\]"),
        ([[0.1, 0.2]], None, [[0, 1]], r"expected 1-d predictions and labels, got shapes \(1, 2\)"),
        (
            [0.1, 0.2],
            [0.1],
            [0, 1],
            "live: expected predictions and labels of one length, got 1 and 2",
        ),
    ],
)
def test_bad_scores_are_refused_with_what_was_expected(
    cand: list[float], live: list[float] | None, labels: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        judge(GATE, cand, live, labels)


# -- the gated export ---------------------------------------------------------------------------


def lr(bias: float, *, loss: LossName = "bce", informative: bool = False) -> CtrModel:
    """An LR model whose probability is ``sigmoid(bias)`` (first-order weights start at 0), or,
    ``informative``, one that also reads the dense columns the synthetic labels depend on."""
    cfg = ModelConfig(arch="lr", buckets=64, embedding_dim=2, hidden=(4,), loss=loss)
    torch.manual_seed(0)
    model = build_model(cfg, SCHEMA)
    with torch.no_grad():
        model.bias.fill_(bias)
        if informative:
            assert model.dense_linear is not None
            # synthetic_batch: coefficient +0.5 on even dense columns, -0.5 on odd ones
            coef = torch.tensor([0.5 if int(j) % 2 == 0 else -0.5 for j in model.regular_cols])
            model.dense_linear.weight.copy_(2 * coef[None, :])
    return model


def held_back(n: int = 3_000, seed: int = 11) -> list[TensorBatch]:
    return [
        synthetic_batch(SCHEMA, n // 2, buckets=64, seed=seed),
        synthetic_batch(SCHEMA, n - n // 2, buckets=64, seed=seed + 1),
    ]


def base_rate(batches: list[TensorBatch]) -> float:
    return float(torch.cat([b.labels for b in batches]).mean())


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def exporter(tmp_path: Path, cfg: ExportConfig = GATE) -> Exporter:
    return Exporter(
        Registry(tmp_path), ModelConfig(arch="lr", buckets=64, embedding_dim=2), SCHEMA, cfg
    )


def test_a_candidate_better_than_live_is_published_with_the_gate_numbers(tmp_path: Path) -> None:
    batches = held_back()
    rate = base_rate(batches)
    live = lr(logit(rate))  # constant and calibrated: AUC 0.5
    cand = lr(logit(rate) - 0.3, informative=True)
    ex = exporter(tmp_path)
    out = ex.maybe_export_gated(cand, 10 * MIN, 5_000, {"window_auc": 0.6}, batches, live)
    assert out.manifest is not None
    assert out.verdict is not None
    assert out.verdict.passed, out.verdict.reason
    assert out.verdict.live_auc == 0.5
    assert out.verdict.auc > 0.6
    assert out.manifest.metrics == {"window_auc": 0.6, **out.verdict.metrics()}
    assert out.manifest.metrics["gate_n"] == 3_000
    assert ex.state.refused == 0
    assert Registry(tmp_path).versions("ctr") == [out.manifest.version]


def test_a_worse_candidate_is_refused_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batches = held_back()
    rate = base_rate(batches)
    live = lr(logit(rate) - 0.3, informative=True)
    cand = lr(logit(rate))
    ex = exporter(tmp_path)
    caplog.set_level(logging.WARNING, logger="minutely.export")
    out = ex.maybe_export_gated(cand, 10 * MIN, 5_000, {}, batches, live, live_version="v00000007")
    assert out.manifest is None
    assert out.verdict is not None
    assert not out.verdict.passed
    assert out.verdict.auc == 0.5 < out.verdict.live_auc - 0.02
    assert ex.state.refused == 1
    assert ex.state.exported == 0
    assert ex.state.last_refusal == f"at {10 * MIN} against live v00000007: {out.verdict.reason}"
    assert f"AUC 0.5000 < live AUC {out.verdict.live_auc:.4f} - 0.02" in ex.state.last_refusal
    assert Registry(tmp_path).versions("ctr") == []
    [record] = [r for r in caplog.records if r.name == "minutely.export"]
    assert record.levelno == logging.WARNING
    assert "live version v00000007 stays" in record.getMessage()
    assert out.verdict.reason in record.getMessage()
    # Still due: the next window is judged again, and a good candidate goes out.
    again = ex.maybe_export_gated(live, 11 * MIN, 5_500, {}, batches, live)
    assert again.manifest is not None
    assert ex.state.refused == 1


def test_a_miscalibrated_candidate_is_refused_without_a_live_version(tmp_path: Path) -> None:
    batches = held_back()
    rate = base_rate(batches)
    ex = exporter(tmp_path)
    out = ex.maybe_export_gated(lr(logit(2 * rate)), 10 * MIN, 5_000, {}, batches, None)
    assert out.manifest is None
    assert out.verdict is not None
    assert out.verdict.pcoc == pytest.approx(2.0, rel=1e-4)
    assert "AUC not judged: no live version" in out.verdict.reason
    assert ex.state.refused == 1


def test_the_gate_scores_with_predict_so_fnc_calibration_counts(tmp_path: Path) -> None:
    batches = held_back()
    rate = base_rate(batches)
    # An fnc model's logit is that of the biased stream: its probability is exp(min(logit, 0)).
    model = lr(math.log(rate), loss="fnc")
    strict = ExportConfig(min_samples=0, min_trained_min=0, gate_pcoc_min=0.97, gate_pcoc_max=1.03)
    out = exporter(tmp_path, strict).maybe_export_gated(model, 0, 1, {}, batches, None)
    assert out.verdict is not None
    assert out.verdict.pcoc == pytest.approx(1.0, rel=1e-4)
    assert out.manifest is not None
    # Read through the sigmoid, the same logit would be off by 1 / (1 + rate).
    assert 1 / (1 + rate) < 0.97


def test_corrections_are_left_out_of_the_gate(tmp_path: Path) -> None:
    batches = held_back()
    first = batches[0]
    first.is_correction[:100] = True
    first.labels[:100] = 1.0
    kept = torch.cat([b.labels[~b.is_correction] for b in batches])
    out = exporter(tmp_path).maybe_export_gated(lr(-1.0), 0, 1, {}, batches, lr(-1.0))
    assert out.verdict is not None
    assert out.verdict.n == 3_000 - 100
    assert out.verdict.positives == int(kept.sum())


def test_a_scorer_callable_and_the_live_predictions_given_by_the_caller(tmp_path: Path) -> None:
    p, y = scores(1_000, 8, 1.0)
    cal = calibrate(p, y)
    scored: list[CtrModel] = []

    def scorer(model: CtrModel) -> tuple[np.ndarray, np.ndarray]:
        scored.append(model)
        return cal, y

    cand, live = lr(0.0), lr(1.0)
    out = exporter(tmp_path).maybe_export_gated(
        cand, 0, 1, {}, scorer, live, live_preds=calibrate(1 - p, y)
    )
    assert scored == [cand]  # the live version's predictions were given: not scored again
    assert out.verdict is not None
    assert out.verdict.live_auc == pytest.approx(1 - out.verdict.auc)
    assert out.manifest is not None


def test_an_export_not_due_says_why_and_scores_nothing(tmp_path: Path) -> None:
    cfg = ExportConfig(every_min=10, min_samples=1_000, min_trained_min=0)
    ex = exporter(tmp_path, cfg)

    def scorer(model: CtrModel) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("scored although no export was due")

    out = ex.maybe_export_gated(lr(0.0), 10 * MIN, 400, {}, scorer, None)
    assert (out.manifest, out.verdict) == (None, None)
    assert out.skipped == "400 samples since the last export, needs 1000"
    assert ex.state.skipped == 1


def test_without_the_gate_the_candidate_is_published_unscored(tmp_path: Path) -> None:
    cfg = ExportConfig(min_samples=0, min_trained_min=0, gate=False)

    def scorer(model: CtrModel) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("scored although the gate is off")

    out = exporter(tmp_path, cfg).maybe_export_gated(lr(3.0), 0, 1, {}, scorer, lr(0.0))
    assert out.manifest is not None
    assert out.verdict is None


def test_a_gated_export_published_before_a_crash_is_adopted(tmp_path: Path) -> None:
    batches = held_back()
    rate = base_rate(batches)
    live = lr(logit(rate))
    cand = lr(logit(rate) - 0.3, informative=True)
    ex = exporter(tmp_path)
    day = ex.export(live, 0, 1_000, {}, as_base=True, mode="day")
    ex.warm_started(0, day.version, 1_000)
    saved = ex.state.to_dict()  # the checkpoint before the crash
    first = ex.maybe_export_gated(cand, 10 * MIN, 5_000, {}, batches, live)
    assert first.manifest is not None
    restored = Exporter(
        Registry(tmp_path),
        ModelConfig(arch="lr", buckets=64, embedding_dim=2),
        SCHEMA,
        GATE,
        ExportState.from_dict(saved),
    )
    again = restored.maybe_export_gated(cand, 10 * MIN, 5_000, {}, batches, live)
    assert again.manifest == first.manifest
    assert Registry(tmp_path).versions("ctr") == [day.version, first.manifest.version]
    assert restored.state == ex.state
    assert (day.mode, day.warm_start, first.manifest.warm_start) == ("day", True, False)


def test_bad_arguments_to_the_gated_export_are_named(tmp_path: Path) -> None:
    p, y = scores(100, 9, 1.0)
    ex = exporter(tmp_path)
    with pytest.raises(ValueError, match="expected live_preds only with a live_model"):
        ex.maybe_export_gated(lr(0.0), 0, 1, {}, lambda m: (p, y), None, live_preds=p)
    with pytest.raises(
        ValueError,
        match=r"live_preds: expected 100 predictions \(the candidate's samples\), "
        r"got shape \(99,\)",
    ):
        ex.maybe_export_gated(lr(0.0), 0, 1, {}, lambda m: (p, y), lr(1.0), live_preds=p[:99])
    with pytest.raises(
        ValueError,
        match=r"candidate: expected the scorer to return \(predictions, labels\), "
        "got list",
    ):
        ex.maybe_export_gated(lr(0.0), 0, 1, {}, lambda m: [p, y], None)  # type: ignore[arg-type,return-value]
    cand = lr(0.0)
    with pytest.raises(
        ValueError,
        match="expected the live version scored on the candidate's samples, got 50 "
        "labels against 100",
    ):
        ex.maybe_export_gated(
            cand, 0, 1, {}, lambda m: (p, y) if m is cand else (p[:50], y[:50]), lr(1.0)
        )
    assert ex.state == ExportState()  # nothing was counted or published


def test_an_empty_held_back_window_judges_nothing_and_passes(tmp_path: Path) -> None:
    out = exporter(tmp_path).maybe_export_gated(lr(0.0), 0, 1, {}, [], lr(1.0))
    assert out.verdict is not None
    assert out.verdict.passed
    assert out.verdict.reason == (
        "passed: PCOC not judged: 0 positives, needs 20; AUC not judged: 0 positives and 0 "
        "negatives, needs 20 of each (n=0, positives=0)"
    )
    assert out.manifest is not None
    assert out.manifest.metrics == {"gate_n": 0.0, "gate_positives": 0.0}


def test_pcoc_needs_min_positives_and_may_stay_as_far_off_as_the_live_version() -> None:
    y = np.array([1] * 20 + [0] * 180, dtype=np.float64)
    few = np.array([1] * 19 + [0] * 181, dtype=np.float64)
    assert (
        "PCOC not judged: 19 positives, needs 20"
        in judge(GATE, np.full(200, 0.5), None, few).reason
    )
    # Candidate PCOC 1.5 is outside the band: refused alone, passed when the live one is worse.
    cand = np.full(200, 0.15)
    assert not judge(GATE, cand, None, y).passed
    worse = judge(GATE, cand, np.full(200, 0.2), y)
    assert worse.passed, worse.reason
    assert "PCOC 1.5 outside [0.75, 1.33] but no further off than live 2" in worse.reason
    better = judge(GATE, cand, np.full(200, 0.11), y)
    assert not better.passed
    assert "refused: PCOC 1.5 outside [0.75, 1.33]" in better.reason
