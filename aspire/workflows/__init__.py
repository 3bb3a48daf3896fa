"""The method's workflows: what the agent, the batch and the CLI run, built from the tools and the models.

    runs.py     opening or resuming a run folder, and loading its recorded dataset, classifier and settings
    probe/      steps 1-4 (hold-out → captions → phrases → edits with controls → findings), and the re-probe
                of a repaired model (`ProbePipeline`)
    repair/     step 5: select the spurious findings' edits (select.py), what to generate from (sources.py),
                generate without the features, filter (filter.py), commit the set (__init__)
    retrain.py  the classifier retrained with the generated images (one recipe for the audit and the batch)
    demo.py     `aspire demo`: toy data → ERM → the audit → repair → report

Data flows data → models → tools → workflows → agent / batch → report, nothing back (as imports the report is a
library the agent and batch call at their end, and the demo sits above the agent: tests/test_layers.py).
"""
