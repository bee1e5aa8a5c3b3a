"""Autopick-BC: a small CNN that tells particles from junk, trained from RELION selections.

``train`` cuts windows around good and bad particles in memory and trains the classifier;
``repick`` slides it over whole micrographs (NMS on the window scores) and writes
``<name>_true.star`` / ``<name>_false.star``; ``classify`` scores existing picks and splits
them the same way. Each maps one task per micrograph over a Dask cluster.
"""

from .classify import classify
from .repick import RepickParams, repick
from .train import TrainParams, train

__all__ = ["RepickParams", "TrainParams", "classify", "repick", "train"]
