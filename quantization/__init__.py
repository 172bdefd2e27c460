"""Quantisation recipes, calibration and studies."""
