import pytest
from pipeline_helpers import small_config

from minutely.config import Config


@pytest.fixture
def small_cfg() -> Config:
    return small_config()
