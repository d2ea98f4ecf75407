"""Calibration data and FP16 / INT8 variants of bundles."""
