"""Benchmarks: one <bench>_eval.py per benchmark, each writing JSON + Markdown results."""
