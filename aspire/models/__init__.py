"""Classifiers: build/load/save (classifier.py), train (train.py), the retraining methods (methods.py; DFR's
last layer in dfr.py), group metrics (metrics.py), evaluate (evaluate.py).

Import the submodules directly (`from aspire.models.classifier import load_checkpoint`); this package
imports nothing itself, so `aspire.models.metrics` stays usable without torch.
"""
