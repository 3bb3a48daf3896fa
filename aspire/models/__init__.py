"""Classifiers: build/load/save (classifier.py), train (train.py), group metrics (metrics.py), evaluate.

Import the submodules directly (`from aspire.models.classifier import load_checkpoint`); this package
imports nothing itself, so `aspire.models.metrics` stays usable without torch.
"""
