"""Datasets, preprocessing and batch orders."""
