"""Calibration sets shipped with the package (data only; see README.md and quantization/calibration.py)."""
