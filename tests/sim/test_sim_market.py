from dataclasses import replace

import numpy as np
import pytest

from minutely.config import SimConfig
from minutely.errors import SchemaError
from minutely.schema import FeatureSpec, Schema, default_schema
from minutely.sim import DayTraffic, Market
from minutely.sim.generate import CTR_PRIOR_IMPRESSIONS, smoothed_ctr

HOUR = 3_600_000
CFG = SimConfig(impressions_per_day=20_000, users=5_000, delay_preset="fast")


@pytest.fixture(scope="module")
def market() -> Market:
    return Market(CFG)


@pytest.fixture(scope="module")
def day1(market: Market) -> DayTraffic:
    return market.simulate_day(1)


def hours_of(m: Market, t: DayTraffic) -> np.ndarray:
    return (t.imp_ts_ms - m.day_start_ms(t.day)) // HOUR


def test_a_day_has_the_configured_volume_spread_over_the_day(
    market: Market, day1: DayTraffic
) -> None:
    assert len(day1) == CFG.impressions_per_day
    assert np.all(np.diff(day1.imp_ts_ms) >= 0)
    per_hour = np.bincount(hours_of(market, day1), minlength=24)
    assert per_hour.sum() == CFG.impressions_per_day
    assert per_hour[20] > 2 * per_hour[4]  # evening peak, night trough
    np.testing.assert_array_equal(day1.features["hour_of_day"], (day1.imp_ts_ms // HOUR) % 24)


def test_ids_and_hierarchy_are_consistent(day1: DayTraffic) -> None:
    f = day1.features
    for name in ("user_id", "ad_id", "campaign_id", "advertiser_id", "category", "slot"):
        assert f[name].dtype == np.int64
        assert f[name].min() >= 0
    assert f["user_id"].max() < CFG.users
    assert f["category"].max() < CFG.categories
    assert f["slot"].max() < CFG.slots
    assert f["device"].max() < CFG.devices
    np.testing.assert_array_equal(f["ad_id"] // CFG.ads_per_campaign, f["campaign_id"])
    # a campaign belongs to one advertiser and one category
    for name in ("advertiser_id", "category"):
        pairs = np.unique(np.stack([f["campaign_id"], f[name]]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]
    for name in ("ad_age_hours", "user_activity", "ad_ctr_1h"):
        assert f[name].dtype == np.float32
        assert np.all(np.isfinite(f[name]))
        assert f[name].min() >= 0


def test_user_interests_hold_one_to_five_known_categories(day1: DayTraffic) -> None:
    values, offsets = day1.jagged("user_interests")
    assert len(offsets) == len(day1) + 1
    assert offsets[0] == 0
    assert offsets[-1] == len(values)
    lengths = np.diff(offsets)
    assert lengths.min() == 1
    assert lengths.max() == 5
    assert values.min() >= 0
    assert values.max() < CFG.categories
    same_user = day1.features["user_id"] == day1.features["user_id"][0]
    rows = np.flatnonzero(same_user)
    firsts = {tuple(values[offsets[i] : offsets[i + 1]].tolist()) for i in rows}
    assert len(firsts) == 1  # a user's logged interests are stable


def test_new_ad_ids_appear_every_hour(market: Market, day1: DayTraffic) -> None:
    ads = day1.features["ad_id"]
    hours = hours_of(market, day1)
    seen = set(market.simulate_day(0).features["ad_id"].tolist())
    for h in range(24):
        now = set(ads[hours == h].tolist())
        assert now - seen, f"no new ad in hour {h}"
        seen |= now
    fresh = day1.features["ad_age_hours"] < 1.0
    assert len(np.unique(ads[fresh])) >= CFG.campaigns_per_hour * 12


def test_ad_ctr_1h_is_the_prior_for_new_ads_and_moves_for_others(day1: DayTraffic) -> None:
    f = day1.features
    fresh = f["ad_age_hours"] < 1.0
    assert fresh.any()
    np.testing.assert_array_equal(f["ad_ctr_1h"][fresh], np.float32(CFG.base_ctr))
    assert np.mean(f["ad_ctr_1h"][~fresh] != np.float32(CFG.base_ctr)) > 0.3


def test_ad_ctr_1h_smooths_the_previous_hour_toward_the_prior() -> None:
    prev_ad = np.array([5, 5, 5, 5, 9])
    prev_clicked = np.array([True, True, False, False, False])
    got = smoothed_ctr(prev_ad, prev_clicked, np.array([9, 5, 7]), prior=0.03)
    m = CTR_PRIOR_IMPRESSIONS
    want = [(0 + 0.03 * m) / (1 + m), (2 + 0.03 * m) / (4 + m), 0.03]
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(smoothed_ctr(prev_ad[:0], prev_clicked[:0], prev_ad, 0.1), 0.1)


def test_mean_ctr_and_cvr_are_near_the_base_rates(market: Market) -> None:
    days = [market.simulate_day(d) for d in (0, 1, 2)]
    clicks = sum(int(d.clicked.sum()) for d in days)
    ctr = clicks / sum(len(d) for d in days)
    assert ctr == pytest.approx(CFG.base_ctr, rel=0.15)
    assert float(np.mean([d.p_click.mean() for d in days])) == pytest.approx(CFG.base_ctr, rel=0.15)
    cvr = sum(int(d.converted.sum()) for d in days) / clicks
    assert cvr == pytest.approx(CFG.base_cvr, rel=0.3)


def test_other_base_rates_are_honoured() -> None:
    m = Market(replace(CFG, base_ctr=0.1, base_cvr=0.3, impressions_per_day=10_000))
    t = m.simulate_day(0)
    assert t.clicked.mean() == pytest.approx(0.1, rel=0.15)
    assert t.converted.sum() / t.clicked.sum() == pytest.approx(0.3, rel=0.15)


def test_truth_matches_the_day(market: Market, day1: DayTraffic) -> None:
    truth = market.truth(1)
    assert set(truth) == {"imp_id", "ts_ms", "p_click", "p_conv", "clicked", "converted"}
    np.testing.assert_array_equal(truth["imp_id"], day1.imp_id)
    assert truth["p_click"].dtype == np.float32
    assert truth["clicked"].dtype == np.bool_
    assert truth["p_click"].min() > 0
    assert truth["p_click"].max() < 1
    # the eventual labels follow the true odds
    hi = truth["p_click"] > np.quantile(truth["p_click"], 0.8)
    assert truth["clicked"][hi].mean() > 2 * truth["clicked"][~hi].mean()


def test_most_volume_goes_to_ads_that_did_not_exist_the_day_before(
    market: Market, day1: DayTraffic
) -> None:
    age = day1.features["ad_age_hours"]
    since_midnight = (day1.imp_ts_ms - market.day_start_ms(1)) / HOUR
    assert np.mean(age <= since_midnight) > 0.5


def category_ctr_shift(m: Market, t: DayTraffic) -> float:
    """Mean absolute change of per-category true CTR (log) between two parts of the day."""
    hours = hours_of(m, t)
    cat = t.features["category"]
    a, b = (hours >= 8) & (hours < 12), (hours >= 18) & (hours < 22)
    shifts = []
    for c in range(m.cfg.categories):
        ca, cb = a & (cat == c), b & (cat == c)
        if ca.sum() > 100 and cb.sum() > 100:
            shifts.append(abs(np.log(t.p_click[ca].mean() / t.p_click[cb].mean())))
    return float(np.mean(shifts))


def test_category_appeal_drifts_within_a_day(market: Market, day1: DayTraffic) -> None:
    still = Market(replace(CFG, drift=0.0))
    assert category_ctr_shift(market, day1) > 1.5 * category_ctr_shift(still, still.simulate_day(1))


def test_ad_quality_decays_with_age(day1: DayTraffic) -> None:
    f = day1.features
    young, old = f["ad_age_hours"] < 3, f["ad_age_hours"] > 24
    assert young.sum() > 500
    assert old.sum() > 500
    assert day1.p_click[young].mean() > day1.p_click[old].mean()


def test_regime_switch_changes_probabilities_from_its_hour_on(market: Market) -> None:
    switched = Market(replace(CFG, regime_switch_hour=30))
    a, b = market.simulate_day(1), switched.simulate_day(1)
    hours = hours_of(market, a)
    before, after = hours < 6, hours >= 6
    np.testing.assert_array_equal(a.features["ad_id"], b.features["ad_id"])  # same traffic
    np.testing.assert_array_equal(a.p_click[before], b.p_click[before])
    diff = np.abs(np.log(a.p_click[after]) - np.log(b.p_click[after]))
    assert diff.mean() > 0.3
    np.testing.assert_array_equal(switched.simulate_day(0).p_click, market.simulate_day(0).p_click)


def test_a_schema_subset_is_emitted_alone() -> None:
    schema = Schema((FeatureSpec("ad_id", "sparse"), FeatureSpec("user_interests", "multi_sparse")))
    m = Market(replace(CFG, impressions_per_day=2_000), schema)
    t = m.simulate_day(0)
    assert list(t.features) == ["ad_id", "user_interests"]
    b = m.events_between(m.day_start_ms(0), m.day_start_ms(0) + HOUR)
    assert b'"features":{"ad_id":' in b.messages()[0][1]
    np.testing.assert_array_equal(t.column("ad_id"), t.features["ad_id"])


def test_features_the_simulator_cannot_emit_are_refused() -> None:
    with pytest.raises(SchemaError, match=r"feature 'price' \(dense\): expected one of"):
        Market(CFG, Schema((FeatureSpec("price", "dense"),)))
    with pytest.raises(SchemaError, match=r"feature 'user_id' \(dense\): expected kind 'sparse'"):
        Market(CFG, Schema((FeatureSpec("user_id", "dense"),)))


def test_column_and_jagged_name_the_wrong_kind(day1: DayTraffic) -> None:
    with pytest.raises(
        SchemaError, match=r"expected a sparse or dense feature, got 'user_interests'"
    ):
        day1.column("user_interests")
    with pytest.raises(
        SchemaError, match=r"expected a multi_sparse feature, got 'user_id' \(sparse\)"
    ):
        day1.jagged("user_id")
    with pytest.raises(SchemaError, match=r"no feature named 'nope'"):
        day1.column("nope")


def test_bad_arguments_are_refused(market: Market) -> None:
    with pytest.raises(ValueError, match=r"expected an int day >= 0, got -1"):
        market.simulate_day(-1)
    with pytest.raises(ValueError, match=r"expected an int day >= 0, got 1.0"):
        market.simulate_day(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected cached_days >= 1, got 0"):
        Market(CFG, cached_days=0)


def test_cached_days_are_the_same_objects(market: Market) -> None:
    assert market.simulate_day(1) is market.simulate_day(1)
    with pytest.raises(ValueError, match="read-only"):
        market.simulate_day(1).p_click[0] = 0.5


def test_default_schema_is_the_simulator_schema(market: Market) -> None:
    assert market.schema == default_schema()
