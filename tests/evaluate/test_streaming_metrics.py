"""Streaming metrics against plain brute-force references, and the window/lifetime views."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minutely.evaluate import AUC, PCOC, PRAUC, LogLoss, Metric, MetricSet, WindowReport

# -- references: loops over the definitions -------------------------------------------------


def ref_auc(p: list[float], y: list[int], w: list[float]) -> float:
    num = pos = neg = 0.0
    for pi, yi, wi in zip(p, y, w, strict=True):
        if yi == 1:
            pos += wi
            for pj, yj, wj in zip(p, y, w, strict=True):
                if yj == 0:
                    num += wi * wj * (1.0 if pi > pj else 0.5 if pi == pj else 0.0)
        else:
            neg += wi
    return num / (pos * neg) if pos > 0 and neg > 0 else math.nan


def ref_ap(p: list[float], y: list[int], w: list[float]) -> float:
    total = sum(wi * yi for yi, wi in zip(y, w, strict=True))
    if total <= 0:
        return math.nan
    ap = prev_recall = 0.0
    for t in sorted(set(p), reverse=True):
        tp = sum(wi * yi for pi, yi, wi in zip(p, y, w, strict=True) if pi >= t)
        flagged = sum(wi for pi, wi in zip(p, w, strict=True) if pi >= t)
        recall = tp / total
        if recall > prev_recall:
            ap += (recall - prev_recall) * tp / flagged
        prev_recall = recall
    return ap


def ref_logloss(p: list[float], y: list[float], w: list[float]) -> float:
    total = sum(w)
    if total <= 0:
        return math.nan
    loss = 0.0
    for pi, yi, wi in zip(p, y, w, strict=True):
        q = min(max(pi, 1e-7), 1 - 1e-7)
        loss += wi * -(yi * math.log(q) + (1 - yi) * math.log(1 - q))
    return loss / total


def ref_pcoc(p: list[float], y: list[float], w: list[float]) -> float:
    observed = sum(wi * yi for yi, wi in zip(y, w, strict=True))
    predicted = sum(wi * pi for pi, wi in zip(p, w, strict=True))
    return predicted / observed if observed > 0 else math.nan


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


# -- generated data: ties, zero weights, several chunks --------------------------------------

GRID = [0.0, 0.05, 0.1, 0.3, 0.5, 0.7, 1.0]
pred = st.one_of(st.sampled_from(GRID), st.floats(0.0, 1.0))


@st.composite
def streams(
    draw: st.DrawFn, soft: bool = False
) -> tuple[list[float], list, list[float] | None, list[int]]:
    n = draw(st.integers(0, 30))
    p = draw(st.lists(pred, min_size=n, max_size=n))
    label = st.floats(0.0, 1.0) if soft else st.sampled_from([0, 1])
    y = draw(st.lists(label, min_size=n, max_size=n))
    weighted = draw(st.booleans())
    w_strategy = st.one_of(st.just(0.0), st.floats(0.0, 5.0))
    w = draw(st.lists(w_strategy, min_size=n, max_size=n)) if weighted else None
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    return p, y, w, cuts


def feed(metric: Metric, p: list[float], y: list, w: list[float] | None, cuts: list[int]) -> None:
    bounds = [0, *cuts, len(p)]
    for a, b in itertools.pairwise(bounds):
        metric.update(
            np.array(p[a:b], dtype=np.float32 if a % 2 else np.float64),
            np.array(y[a:b]),
            None if w is None else np.array(w[a:b]),
        )


@settings(max_examples=150, deadline=None)
@given(streams())
def test_auc_equals_the_pairwise_definition_with_ties(data: tuple) -> None:
    p, y, w, cuts = data
    p = [float(np.float32(v)) for v in p]  # chunks may arrive as float32
    m = AUC()
    feed(m, p, y, w, cuts)
    assert m.n == len(p)
    assert same(m.get(), ref_auc(p, y, w or [1.0] * len(p)))


@settings(max_examples=150, deadline=None)
@given(streams())
def test_prauc_equals_step_wise_average_precision(data: tuple) -> None:
    p, y, w, cuts = data
    p = [float(np.float32(v)) for v in p]
    m = PRAUC()
    feed(m, p, y, w, cuts)
    assert same(m.get(), ref_ap(p, y, w or [1.0] * len(p)))


@settings(max_examples=150, deadline=None)
@given(streams(soft=True))
def test_logloss_and_pcoc_equal_their_definitions(data: tuple) -> None:
    p, y, w, cuts = data
    p = [float(np.float32(v)) for v in p]
    ll, pcoc = LogLoss(), PCOC()
    feed(ll, p, y, w, cuts)
    feed(pcoc, p, y, w, cuts)
    ones = [1.0] * len(p)
    assert same(ll.get(), ref_logloss(p, y, w or ones))
    assert same(pcoc.get(), ref_pcoc(p, y, w or ones))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(GRID), st.sampled_from([0, 1]), st.integers(0, 3)), max_size=25
    )
)
def test_integer_weights_equal_repeated_rows(rows: list[tuple[float, int, int]]) -> None:
    for cls in (AUC, PRAUC, LogLoss, PCOC):
        weighted, repeated = cls(), cls()
        if rows:
            p, y, w = (np.array(c) for c in zip(*rows, strict=True))
            weighted.update(p, y, w)
            repeated.update(np.repeat(p, w), np.repeat(y, w))
        assert same(weighted.get(), repeated.get()), cls.__name__


# -- fixed cases ----------------------------------------------------------------------------


def test_known_values() -> None:
    p = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    auc, ap = AUC(), PRAUC()
    auc.update(p, y)
    ap.update(p, y)
    assert auc.get() == 0.75
    assert ap.get() == pytest.approx((1.0 + 2 / 3) / 2)
    tied = AUC()
    tied.update(np.array([0.5, 0.5]), np.array([0, 1]))
    assert tied.get() == 0.5


def test_undefined_values_are_nan() -> None:
    one_class = AUC()
    one_class.update(np.array([0.2, 0.9]), np.array([1, 1]))
    assert math.isnan(one_class.get())
    no_pos = PRAUC()
    no_pos.update(np.array([0.2, 0.9]), np.array([0, 0]))
    assert math.isnan(no_pos.get())
    all_pos = PRAUC()
    all_pos.update(np.array([0.2, 0.9]), np.array([1, 1]))
    assert all_pos.get() == 1.0
    zero_weight = PCOC()
    zero_weight.update(np.array([0.2]), np.array([1]), np.array([0.0]))
    assert math.isnan(zero_weight.get())
    for cls in (AUC, PRAUC, LogLoss, PCOC):
        assert math.isnan(cls().get())


def test_direction_and_ideal() -> None:
    assert AUC.bigger_is_better
    assert PRAUC.bigger_is_better
    assert not LogLoss.bigger_is_better
    assert not PCOC.bigger_is_better
    assert (AUC.ideal, LogLoss.ideal, PCOC.ideal) == (1.0, 0.0, 1.0)


def test_reset_forgets_everything_and_get_is_repeatable() -> None:
    for cls in (AUC, PRAUC, LogLoss, PCOC):
        m = cls()
        m.update(np.array([0.1, 0.9, 0.4]), np.array([0, 1, 1]))
        first = m.get()
        m.update(np.array([0.6]), np.array([0]))
        assert m.get() != first or cls is PCOC
        assert m.get() == m.get()
        m.reset()
        assert m.n == 0
        assert math.isnan(m.get())
        assert f"{cls.__name__}: nan (n=0)" == repr(m)


def test_logloss_stays_finite_at_certain_wrong_predictions() -> None:
    m = LogLoss()
    m.update(np.array([0.0, 1.0]), np.array([1, 0]))
    assert m.get() == pytest.approx(-math.log(1e-7))


@pytest.mark.parametrize(
    ("metric", "preds", "labels", "weights", "match"),
    [
        (AUC(), [0.1, 0.2], [0], None, r"AUC.update: expected .* one length, got 2, 1, 2"),
        (AUC(), [0.1, float("nan")], [0, 1], None, r"expected predictions finite, got \[nan\]"),
        (AUC(), [0.1, 0.2], [0, 0.5], None, r"expected labels in \{0, 1\}, got \[0.5\]"),
        (PRAUC(), [0.1], [1], [-1.0], r"expected finite weights >= 0, got \[-1.\]"),
        (LogLoss(), [0.1, 1.5], [0, 1], None, r"expected predictions in \[0, 1\], got \[1.5\]"),
        (PCOC(), [0.1], [1.5], None, r"PCOC.update: expected labels in \[0, 1\], got \[1.5\]"),
        (LogLoss(), [0.1], [1], [float("inf")], r"expected finite weights >= 0, got \[inf\]"),
    ],
)
def test_bad_inputs_are_refused(
    metric: Metric, preds: list, labels: list, weights: list | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        metric.update(preds, labels, weights)
    assert metric.n == 0


def test_auc_over_many_chunks_is_exact_and_compacted() -> None:
    rng = np.random.default_rng(0)
    m, whole = AUC(), AUC()
    ps, ys = [], []
    for _ in range(200):
        p = rng.random(500).round(2)  # many ties
        y = (rng.random(500) < p).astype(np.int64)
        m.update(p, y)
        ps.append(p)
        ys.append(y)
    whole.update(np.concatenate(ps), np.concatenate(ys))
    assert m.get() == whole.get()
    assert m.n == 100_000
    assert len(m._chunks) == 1


# -- MetricSet ------------------------------------------------------------------------------


def standalone(cls: type[Metric], p: np.ndarray, y: np.ndarray) -> float:
    m = cls()
    m.update(p, y)
    return m.get()


def test_metric_set_reports_each_window_and_the_lifetime() -> None:
    rng = np.random.default_rng(1)
    ms = MetricSet()
    all_p, all_y = [], []
    for window in range(3):
        p = rng.random(300)
        y = (rng.random(300) < p).astype(np.int64)
        ms.update(p[:100], y[:100])
        ms.update(p[100:], y[100:])
        assert ms.window_n == 300
        report = ms.close_window(window_start_ms=window * 300_000)
        assert isinstance(report, WindowReport)
        assert (report.window_start_ms, report.n) == (window * 300_000, 300)
        assert report.positives == int(y.sum())
        assert report.auc == standalone(AUC, p, y)
        assert report.prauc == standalone(PRAUC, p, y)
        # Running sums over two updates: equal up to float rounding.
        assert report.logloss == pytest.approx(standalone(LogLoss, p, y), rel=1e-12)
        assert report.pcoc == pytest.approx(standalone(PCOC, p, y), rel=1e-12)
        assert ms.window_n == 0
        all_p.append(p)
        all_y.append(y)
    assert [w.window_start_ms for w in ms.windows] == [0, 300_000, 600_000]
    p, y = np.concatenate(all_p), np.concatenate(all_y)
    life = ms.lifetime()
    assert life["n"] == 900
    assert life["positives"] == y.sum()
    assert life["auc"] == pytest.approx(standalone(AUC, p, y))
    assert life["prauc"] == pytest.approx(standalone(PRAUC, p, y))
    assert life["logloss"] == pytest.approx(standalone(LogLoss, p, y))
    assert life["pcoc"] == pytest.approx(standalone(PCOC, p, y))
    assert ms.windows[0].to_dict()["n"] == 300


def test_an_empty_window_reports_zero_rows_and_nan_metrics() -> None:
    report = MetricSet().close_window(0)
    assert (report.n, report.positives) == (0, 0)
    assert all(math.isnan(v) for v in (report.auc, report.logloss, report.pcoc, report.prauc))


def test_metric_set_refuses_out_of_order_windows_and_bad_inputs() -> None:
    ms = MetricSet()
    ms.close_window(600_000)
    with pytest.raises(ValueError, match=r"expected window_start_ms > 600000, got 300000"):
        ms.close_window(300_000)
    with pytest.raises(ValueError, match=r"MetricSet.update: expected predictions in \[0, 1\]"):
        ms.update(np.array([1.2]), np.array([1]))
    with pytest.raises(ValueError, match=r"MetricSet.update: expected labels in \{0, 1\}"):
        ms.update(np.array([0.2]), np.array([0.5]))
    ms.reset()
    assert ms.windows == []
    assert ms.lifetime()["n"] == 0
