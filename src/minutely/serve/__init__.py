"""The inference HTTP server: predict endpoints, registry polling, atomic hot swap.

The predictor of a version comes from an injected :data:`PredictorFactory`; the default one
(:func:`torch_factory`) builds the model with :mod:`minutely.model`. Nothing here imports the
training code.
"""

from minutely.serve.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INSTANCES,
    ServingState,
    create_app,
    torch_factory,
)
from minutely.serve.batcher import Batcher, BatchSettings
from minutely.serve.codec import ARROW_STREAM, BodyError, decode_body, encode_arrow
from minutely.serve.holder import LoadedModel, ModelHolder, Predictor, PredictorFactory, Refusal
from minutely.serve.metrics import ServeMetrics
from minutely.serve.poller import RegistryPoller

__all__ = [
    "ARROW_STREAM",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_INSTANCES",
    "BatchSettings",
    "Batcher",
    "BodyError",
    "LoadedModel",
    "ModelHolder",
    "Predictor",
    "PredictorFactory",
    "Refusal",
    "RegistryPoller",
    "ServeMetrics",
    "ServingState",
    "create_app",
    "decode_body",
    "encode_arrow",
    "torch_factory",
]
