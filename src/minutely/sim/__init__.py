"""The ad-market simulator: users, campaigns and ads that come and go, drifting click and
conversion odds, and delayed feedback.

>>> from minutely.config import SimConfig
>>> m = Market(SimConfig(impressions_per_day=1_000, users=300, delay_preset="fast"))
>>> len(m.simulate_day(0))
1000
"""

from minutely.sim.batch import CLICK, CONVERSION, IMPRESSION, EventBatch
from minutely.sim.delays import DELAY_PRESETS, DelayModel, LogNormalMixture
from minutely.sim.generate import IMP_ID_STRIDE
from minutely.sim.market import Market
from minutely.sim.traffic import DayTraffic, Features

__all__ = [
    "CLICK",
    "CONVERSION",
    "DELAY_PRESETS",
    "IMPRESSION",
    "IMP_ID_STRIDE",
    "DayTraffic",
    "DelayModel",
    "EventBatch",
    "Features",
    "LogNormalMixture",
    "Market",
]
