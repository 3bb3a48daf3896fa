"""What the chat (with or without an LLM) can look up and do in one run: `RunTools`, every method returning
JSON-able data, and the same methods as LangChain tools for the LLM (`langchain_tools`).

    RunTools(run_dir)   summary, findings, phrase_stats, edits (of a finding's group), finding_for (a phrase's
                        finding), probe (a phrase now: a caption phrase, or any concept the grounder finds),
                        approve_and_retrain
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from aspire.errors import AspireError, error_line
from aspire.schemas import Edit, Finding, Probe
from aspire.store_schema import AuditMeta
from aspire.tools import lexicon
from aspire.tools.probe import evidence_order, finding_edits


def evidence(f: Finding) -> dict:
    """A finding's evidence as the chat tools show it."""
    return {"edits": f.occurrences, "effect": round(f.effect, 3), "effect_ci": [round(v, 3) for v in f.effect_ci],
            "q_value": float(f"{f.q_value:.3g}"), "p_value": float(f"{f.p_value:.3g}"), "control_kind": f.control_kind,
            "flips": f.flips, "flip_rate": round(f.flip_rate, 3), "control_flip_rate": round(f.control_flip_rate, 3),
            "joint": f.joint, "joint_effect": None if f.joint_effect is None else round(f.joint_effect, 3),
            "joint_q_value": None if f.joint_q_value is None else float(f"{f.joint_q_value:.3g}"),
            "after": None if f.after is None else {
                "effect": round(f.after.effect, 3), "effect_ci": [round(v, 3) for v in f.after.effect_ci],
                "q_value": float(f"{f.after.q_value:.3g}"), "flip_rate": round(f.after.flip_rate, 3),
                "spurious": f.after.spurious, "verdict": f.after.verdict}}

class RunTools:
    """What the assistant can look up or do in one run. Every method returns JSON-able data."""

    def __init__(self, run_dir: str | Path, *, device: Optional[str] = None, progress: bool = True, context=None):
        """`context`: an AuditContext to probe with (default: rebuilt from the run's meta on first need)."""
        from aspire.store import RunStore

        self.run_dir = Path(run_dir)
        if not (self.run_dir / RunStore.DB_NAME).is_file():
            raise AspireError(f"{self.run_dir}: not a run folder (no {RunStore.DB_NAME}); "
                              "run `aspire audit` or `aspire probe` first, or pass --run-dir")
        self.store = context.pipeline.store if context is not None else RunStore(self.run_dir)
        self.device = device
        self.progress = progress
        self._ctx = context

    # ------------------------------------------------------------ helpers
    @property
    def class_names(self) -> list[str]:
        if self._ctx is not None:
            return list(self._ctx.pipeline.class_names)
        record = self.store.get_meta("record") or {}
        names = (record.get("classifier") or {}).get("classes")
        if names:
            return list(names)
        by_index = {f.class_index: f.class_ for f in self.store.all("finding", Finding)}
        return [by_index.get(i, str(i)) for i in range(max(by_index, default=-1) + 1)]

    def context(self):
        """The audit context (dataset, classifier, pipeline), loaded on first need."""
        if self._ctx is None:
            from aspire.agent import context_from_run

            self._ctx = context_from_run(self.run_dir, device=self.device, progress=self.progress)
        return self._ctx

    def _class_index(self, name: str) -> int:
        from aspire.workflows.runs import class_index

        return class_index(name, self.class_names, loose=True)

    def findings_list(self) -> list[Finding]:
        from aspire.agent import sorted_findings

        return sorted_findings(self.store)

    # ------------------------------------------------------------ tools
    def summary(self) -> dict:
        """What the run holds: inputs, counts, the audit's status, approvals and accuracy."""
        from aspire.agent import CHECKPOINTS

        findings = self.findings_list()
        status = (self.store.meta("audit", AuditMeta()).status
                  or ("paused or unfinished" if (self.run_dir / CHECKPOINTS).is_file() else "probe only"))
        evaluation = self.store.get_meta("evaluation") or {}
        return {
            "run_dir": str(self.run_dir), "kind": self.store.get_meta("kind"), "status": status,
            "inputs": self.store.get_meta("args"), "classes": self.class_names,
            "holdout": len(self.store.get_meta("holdout", []) or []), "edits": sum(e.test == "removal" for e in self.store.all("edit", Edit)),
            "probes": self.store.count("probe"), "findings": len(findings),
            "spurious": [f"{f.class_}: {f.phrase} ({f.kind})" for f in findings if f.spurious],
            "rounds": len({e.get("round") for e in self.store.events("outcome") if e.get("round")}), "approvals": self.store.get_meta("approvals", []),
            "augmented": self.store.get_meta("augmented"),
            "accuracy": {k: {"worst_group_accuracy": v.get("worst_group_accuracy"),
                             "average_accuracy": v.get("average_accuracy"), "split": v.get("split")}
                         for k, v in evaluation.items() if isinstance(v, dict)},
            "reprobe": self.store.get_meta("reprobe"),
        }

    def findings(self, class_name: Optional[str] = None, spurious_only: bool = False, limit: int = 20) -> dict:
        """Findings (spurious first): phrase, kind, effect with its interval, q-value, control kind, flips."""
        found = self.findings_list()
        if class_name:
            y = self._class_index(class_name)
            found = [f for f in found if f.class_index == y]
        if spurious_only:
            found = [f for f in found if f.spurious]
        rows = [{"class": f.class_, "phrase": f.phrase, "kind": f.kind, **evidence(f), "spurious": f.spurious,
                 "merged": f.phrases} for f in found[:max(1, int(limit))]]
        return {"n": len(found), "shown": len(rows), "findings": rows}

    def phrase_stats(self, class_name: str, limit: int = 15) -> dict:
        """How often each phrase group occurs in a class's hold-out images vs the other classes (lift)."""
        from aspire.agent.nodes import current_stats

        y = self._class_index(class_name)
        stats = current_stats(self.context()).get(y)
        if stats is None:
            raise AspireError(f"class {self.class_names[y]!r} was not probed in this run")
        tested = {e.get("phrase") for e in self.store.events("outcome") if e.get("class_index") == y}
        return {"class": self.class_names[y], "groups": [{**s.to_prompt(), "tested": s.phrase in tested}
                                                         for s in stats[:max(1, int(limit))]]}

    def finding_for(self, phrase: Optional[str] = None, class_name: Optional[str] = None) -> Optional[Finding]:
        """The finding a phrase names (its group's name or a member, else a near-duplicate), of a class if given;
        spurious ones first, then the most edits. No phrase: the strongest finding (of the class)."""
        found = self.findings_list()
        if class_name:
            y = self._class_index(class_name)
            found = [f for f in found if f.class_index == y]
        if not phrase:
            return found[0] if found else None
        wanted = lexicon.normalize(phrase)
        for test in (lambda f: wanted in (f.phrase, *f.phrases),
                     lambda f: lexicon.same_as_any(wanted, (f.phrase, *f.phrases))):
            hits = [f for f in found if test(f)]
            if hits:
                return max(hits, key=lambda f: (f.spurious, f.occurrences))
        return None

    def edits(self, phrase: str, class_name: Optional[str] = None, limit: int = 10) -> dict:
        """The edits of a finding (the phrase's group: all its member phrases, its class and kind), flipped first:
        image, edited PNG, its control, flipped or not. A phrase of no finding: the edits of that phrase."""
        f = self.finding_for(phrase, class_name)
        y = f.class_index if f else (self._class_index(class_name) if class_name else None)
        members = {f.phrase, *f.phrases} if f else {lexicon.normalize(phrase)}
        edits = {e.edit_id: e for e in self.store.all("edit", Edit)}
        probes = [p for p in self.store.all("probe", Probe) if p.test == "removal"]
        controls = {p.pair_key: p for p in probes if p.control}
        if f is not None:
            mine = finding_edits(f, probes)
        else:   # a phrase of no finding: its own edits
            mine = sorted((p for p in probes if not p.control and (y is None or p.y == y)
                           and lexicon.same_phrase(p.phrase, phrase)), key=evidence_order)
        rows = []
        for p in mine[:max(1, int(limit))]:
            control = controls.get(p.pair_key)
            edit, control_edit = edits.get(p.edit_id), edits.get(control.edit_id) if control else None
            rows.append({"edit_id": p.edit_id, "image": p.image, "phrase": p.phrase, "kind": p.kind,
                         "flipped": p.flipped, "prob_true_before": round(p.prob_true_original, 3),
                         "prob_true_after": round(p.prob_true_edited, 3),
                         "edited_png": edit.edited_png if edit else None,
                         "control_png": control_edit.edited_png if control_edit else None,
                         "control_kind": control.control_kind if control else None,
                         "control_flipped": control.flipped if control else None,
                         "donor": edit.donor if edit else None})
        return {"finding": None if f is None else {"class": f.class_, "phrase": f.phrase, "kind": f.kind,
                                                   "spurious": f.spurious, **evidence(f)},
                "phrase": f.phrase if f else lexicon.normalize(phrase), "members": sorted(members),
                "n_edits": len(mine), "n_flipped": sum(p.flipped for p in mine),
                "n_controls": sum(p.pair_key in controls for p in mine), "edits": rows}

    def probe(self, class_name: str, phrase: str) -> dict:
        """Edit and test one phrase on one class now (with controls); returns its finding. A phrase no caption
        of the class names is looked for first with the grounding backend (any concept it can find)."""
        from aspire.agent.nodes import current_stats
        from aspire.agent.planner import finding_for, match_group

        ctx = self.context()
        p = ctx.pipeline
        y = self._class_index(class_name)
        if y not in p.class_ids:
            raise AspireError(f"class {self.class_names[y]!r} was not probed in this run (its hold-out has no images)")
        # 1. the phrase's group among the class's caption phrases, else the concept looked for in its images
        group = match_group(current_stats(ctx).get(y, []), None, phrase, ctx.config.probe.merge_similarity)
        looked = None
        if group is None:
            looked = p.look_for(y, phrase)
            if looked[1] < ctx.config.probe.min_occurrences:
                return {"class": self.class_names[y], "phrase": lexicon.normalize(phrase), "result": "not found",
                        "images_looked_at": looked[0], "images_showing_it": looked[1],
                        "grounding_backend": ctx.config.ground.backend,
                        "why": _not_found_reason(ctx.config.ground.backend, looked, ctx.config.probe.min_occurrences)}
            group = match_group(current_stats(ctx).get(y, []), None, phrase, ctx.config.probe.merge_similarity)
        members = list(group.phrases) if group else [lexicon.normalize(phrase)]
        # 2. edit, classify, aggregate
        p.make_edits(only_phrases={y: set(members)})
        p.probe()
        p.test_further(p.findings())
        findings = p.findings()
        kind = group.kind if group else "foreground"
        f = finding_for(findings, y, kind, members)
        # 3. the reasoning trail
        name = group.phrase if group else members[0]
        self.store.log_event("hypothesis", {"round": None, "class": self.class_names[y], "class_index": y,
                                            "phrase": name, "kind": kind, "phrases": members,
                                            "reason": "asked in chat" + (" (looked for: no caption named it)"
                                                                         if looked else ""), "source": "chat"})
        result = ("not probed" if f is None else "spurious" if f.spurious else "not spurious")
        self.store.log_event("outcome", {"round": None, "class": self.class_names[y], "class_index": y,
                                         "phrase": name, "kind": kind, "source": "chat", "result": result,
                                         **({} if f is None else {"occurrences": f.occurrences, **evidence(f)})})
        if f is None:
            return {"class": self.class_names[y], "phrase": phrase, "result": "not probed",
                    "why": self._why_not_edited(y, members, {k for k, x in p.samples.items() if x.y == y})}
        out = {"class": f.class_, "phrase": f.phrase, "kind": f.kind, "result": result, **evidence(f)}
        return out if looked is None else {**out, "images_looked_at": looked[0], "images_showing_it": looked[1]}

    def _why_not_edited(self, y: int, members: list[str], mine: set[str]) -> str:
        """Why a group of phrases has no edits in class y (its images `mine`): its regions not found, its edits
        skipped (the most common reasons first)."""
        from collections import Counter

        from aspire.schemas import Region

        names = {lexicon.normalize(m) for m in members}
        regions = [r for r in self.store.all("region", Region) if lexicon.normalize(r.phrase) in names
                   and r.image in mine]
        missing = Counter((r.reason or "not found").split(" (")[0] for r in regions if not r.grounded)
        skipped = Counter(str(e.get("reason")) for e in self.store.events("skipped")
                          if lexicon.normalize(str(e.get("phrase"))) in names and e.get("image") in mine)
        parts = [f"not found in {n} images ({reason})" for reason, n in missing.most_common(2)]
        parts += [f"{n} edits not made ({reason})" for reason, n in skipped.most_common(2)]
        return "; ".join(parts) or "no image of the class shows it"

    def approve_and_retrain(self) -> dict:
        """Approve the paused audit as proposed: generate, retrain, evaluate, report."""
        from aspire.agent import run_audit

        if self.store.get_meta("kind") != "audit":
            raise AspireError(f"{self.run_dir} is a {self.store.get_meta('kind')} run, not an audit: run "
                              "`aspire audit` on the same inputs to repair the classifier")
        if self.store.meta("audit", AuditMeta()).status == "done":
            return {"status": "done", "note": "this audit has finished already", **self.summary()["accuracy"]}
        result = run_audit(self.context(), approve=lambda payload: {"decision": "approve", "auto": False,
                                                                    "via": "chat"})
        s = result.to_json()
        return {"status": s["status"], "approvals": s["approvals"], "augmented": s["augmented"],
                "accuracy": s["accuracy"], "reprobe": s["reprobe"], "report": s["report"]}


def langchain_tools(tools: RunTools) -> list:
    """The RunTools methods as LangChain tools (thin adapters; results as JSON text)."""
    from langchain_core.tools import StructuredTool

    def adapt(fn: Callable[..., dict], name: str) -> Any:
        def call(**kwargs: Any) -> str:
            try:
                return json.dumps(fn(**kwargs), default=str)
            except Exception as e:  # noqa: BLE001 - any tool error is the LLM's to read, not a failed LLM call
                return json.dumps({"error": error_line(e)})
        return StructuredTool.from_function(func=call, name=name, description=fn.__doc__ or name,
                                            args_schema=_schema_of(fn, name))

    return [adapt(tools.summary, "summary"), adapt(tools.findings, "findings"),
            adapt(tools.phrase_stats, "phrase_stats"), adapt(tools.edits, "edits"),
            adapt(tools.probe, "probe"), adapt(tools.approve_and_retrain, "approve_and_retrain")]


def _schema_of(fn: Callable, name: str):
    """A pydantic args model from a method's signature."""
    import inspect

    from pydantic import create_model

    fields: dict[str, Any] = {}
    for pname, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation if param.annotation is not inspect.Parameter.empty else str
        if isinstance(annotation, str):
            annotation = {"str": str, "int": int, "bool": bool, "Optional[str]": Optional[str]}.get(annotation, str)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, default)
    return create_model(f"{name}_args", **fields)


def _not_found_reason(backend: str, looked: tuple[int, int], needed: int) -> str:
    n, shown = looked
    where = f"found it in {shown} of the class's {n} hold-out images (a test needs {needed})"
    if backend == "annotations":
        return (f"no caption names it, and the offline grounder (annotations) {where}: it finds only regions "
                "annotated under that name. With ground.backend = \"transformers\" (GroundingDINO + SAM) any "
                "phrase can be looked for.")
    return f"no caption names it, and the grounder ({backend}) {where}"
