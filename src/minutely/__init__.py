"""minutely: minute-level online deep learning for ad pCTR and pCVR models."""

__version__ = "0.1.0"
