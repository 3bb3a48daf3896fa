"""The toy benchmarks: planted spurious features, exact counterfactuals, and measured reliance.

`write_benchmark("toy-waterbirds" | "toy-multiclass", out, seed=...)` writes a dataset in the waterbirds
format with annotations, ground truth and a counterfactual test set; `measure_reliance(clf, root)` reads
that set back and reports how much a classifier's accuracy drops when each element is gone.
"""

from aspire.data.toy.benchmark import BENCHMARKS, write_benchmark
from aspire.data.toy.reliance import Reliance, measure_reliance, read_counterfactuals
from aspire.data.toy.render import render
from aspire.data.toy.scenes import Scene, sample_scenes

__all__ = ["BENCHMARKS", "Reliance", "Scene", "measure_reliance", "read_counterfactuals", "render",
           "sample_scenes", "write_benchmark"]
