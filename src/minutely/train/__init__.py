"""Training: losses, the online trainer and atomic checkpoints."""

from minutely.train.checkpoint import (
    checkpoint_tensors,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from minutely.train.losses import (
    BCELoss,
    DistilledLoss,
    FNCLoss,
    FNWLoss,
    Loss,
    PULoss,
    bce_loss,
    loss_names,
    make_loss,
    model_loss,
    register_loss,
)
from minutely.train.optim import RowSparseAdam
from minutely.train.state import TrainingState
from minutely.train.trainer import DENSE, SPARSE, Trainer, TrainerState, frozen_names

__all__ = [
    "DENSE",
    "SPARSE",
    "BCELoss",
    "DistilledLoss",
    "FNCLoss",
    "FNWLoss",
    "Loss",
    "PULoss",
    "RowSparseAdam",
    "Trainer",
    "TrainerState",
    "TrainingState",
    "bce_loss",
    "checkpoint_tensors",
    "frozen_names",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "loss_names",
    "make_loss",
    "model_loss",
    "register_loss",
    "save_checkpoint",
]
