"""Batch audits: one audit per class (or per group of classes), in-process, in a process pool or on Ray.

    run_batch(batch_dir, data=..., model=..., classes=None, group_size=1, config=..., repair=False) -> BatchResult
    plan_units(class_names, group_size) -> [(unit id, [class names])]

    driver.py     the batch itself (units, retries, the single repair, re-probes)
    tasks.py      what a worker runs (one audit, the repair, a re-probe); executors.py where it runs
    state.py      the batch store;  merge.py  batch.json;  progress.py  the terminal view

Each unit is `aspire audit --yes --classes C` in its own resumable run folder BATCH_DIR/runs/<class-slug>/
(the agent graph with its checkpoints), answered automatically by the batch (recorded as automatic
approvals; a batch never asks):

- the audit runs probe + review per class: hold-out, captions, phrases, hypothesize ⇄ probe, review. It does
  not retrain per class: N classifiers retrained for N classes would be wasted work, and each would repair
  one class only. Without --repair generation is declined too, and the class run ends with its evaluation
  (of the audited classifier, computed once for the batch) and its own report.
- with --repair each class run also generates its augmented set from its approved (spurious) findings
  (BATCH_DIR/runs/<class-slug>-augmented, the generation being per class anyway), declines retraining, and
  once every class is done the batch retrains ONE classifier on the training split plus the union of those
  sets (the audited model's recipe, workflows/retrain.py), then evaluates it: BATCH_DIR/repair/after.pt.

A unit that fails is retried (batch.retries, default 1), then reported as failed with its error (one line);
the others go on. The batch's state is BATCH_DIR/batch.sqlite (aspire/batch/state.py); only this driver
writes it. Re-running the same command skips finished units and resumes the others from their run folders
and checkpoints (failed ones are tried again). The results merge into BATCH_DIR/batch.json and
BATCH_DIR/report/batch.{html,md} (aspire.report.batch).

On a Ray cluster (batch.address) every node needs aspire installed and the data, the model and BATCH_DIR on
a shared filesystem at the same paths: tasks write their class run folders there.
"""

from aspire.batch.driver import BatchResult, plan_units, run_batch

__all__ = ["BatchResult", "plan_units", "run_batch"]
