"""The audit report of one run, read entirely from its run store (docs/RUN_STORE.md).

`RunReport(run_dir).write(out_dir)` writes `report.html` (self-contained: CSS inline, images as data
URIs), `report.md` (images as relative links into `img/`) and `report.json` (a machine-readable summary).
Everything the run recorded is shown; what it has not recorded (no retrained model, no evaluation, no
augmented set) is said, never guessed. Nothing here depends on a particular dataset.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from pydantic import ValidationError

from aspire.atomic import write_bytes, write_json, write_text
from aspire.config import AspireConfig
from aspire.errors import AspireError
from aspire.report.assets import Assets, Img, open_image, plain
from aspire.report.text import fmt_acc, fmt_delta, fmt_p, fmt_rate, fmt_time, short, template_env
from aspire.schemas import Edit, EvalResult, Finding, PhraseSet, Probe, Region
from aspire.store import RunStore
from aspire.tools.probe import finding_edits, rank_key

TRAIL_EVENTS = ("hypothesis", "outcome", "approval", "llm_failure")
TRAIL_FIELDS = ("class", "phrase", "kind", "stage", "decision", "source", "reason")
ASSET_NAME = re.compile(r"[0-9a-f]{16}\.(png|jpg)|flip_rates\.png|effect_change\.png")


# ---------------------------------------------------------------- the report
class RunReport:
    """Collects one run's results from its store and renders them (HTML, Markdown, JSON)."""

    def __init__(self, run_dir: str | Path, *, max_examples: int = 6, max_gallery_findings: int = 12,
                 max_generated: int = 2, device: Optional[str] = None):
        # 1. check that the folder holds a run (RunStore would create an empty one)
        run_dir = Path(run_dir).expanduser()
        if not (run_dir / RunStore.DB_NAME).is_file():
            raise AspireError(f"{run_dir}: not a run folder (no {RunStore.DB_NAME}); pass the --run-dir of a probe or audit")
        self.store = RunStore(run_dir)
        if self.store.get_meta("args") is None and self.store.get_meta("kind") is None:
            self.store.close()
            raise AspireError(f"{run_dir}: {RunStore.DB_NAME} holds no run (no 'args' or 'kind' recorded)")
        self.run_dir = self.store.run_dir
        self.max_examples = max_examples
        self.max_gallery_findings = max_gallery_findings
        self.max_generated = max_generated
        self.device = device
        self.assets = Assets()
        self.notes: list[str] = []   # what could not be shown, and why

    # ------------------------------------------------------------ small readers
    def _resolve(self, path: Optional[str]) -> Optional[Path]:
        """A recorded file path; a run folder that moved keeps working (`<run_dir>/<folder>/<name>`)."""
        if not path:
            return None
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = self.run_dir / p
        if p.is_file():
            return p
        moved = self.run_dir / p.parent.name / p.name
        return moved if moved.is_file() else p

    def _class_names(self, findings: list[Finding]) -> list[str]:
        record = self.store.get_meta("record") or {}
        names = (record.get("classifier") or {}).get("classes") if isinstance(record, dict) else None
        if isinstance(names, list) and names:
            return [str(n) for n in names]
        by_index = {f.class_index: f.class_ for f in findings}
        return [by_index.get(i, str(i)) for i in range(max(by_index, default=-1) + 1)]

    def _name(self, names: list[str], index: int) -> str:
        return names[index] if 0 <= index < len(names) else str(index)

    # ------------------------------------------------------------ sections
    def findings(self) -> list[Finding]:
        found = self.store.all("finding", Finding)
        # the order of aggregation (tools/probe.py): spurious first, then by effect over the control
        found.sort(key=rank_key)
        return found

    def counts(self, findings: list[Finding]) -> dict[str, Any]:
        holdout = set(self.store.get_meta("holdout", []) or [])   # not the donors, which only lend backgrounds
        regions = [r for r in self.store.all("region", Region) if r.image in holdout]
        edits = self.store.all("edit", Edit)
        augmented = self.store.get_meta("augmented") or {}
        skipped = Counter(str(e.get("reason") or "no reason recorded") for e in self.store.events("skipped"))
        not_grounded = Counter(str(r.reason or "no reason recorded") for r in regions if not r.grounded)
        return {
            "holdout": len(holdout),
            "captions": sum(self.store.has("caption", k) for k in holdout),
            "phrase_failures": sum(1 for p in self.store.all("phrases", PhraseSet) if p.failed and p.image in holdout),
            "regions": len(regions),
            "not_grounded": sum(not_grounded.values()),
            "edits": sum(1 for e in edits if not e.control and e.test == "removal"),
            "control_edits": sum(1 for e in edits if e.control and e.test == "removal"),
            "insertion_edits": sum(1 for e in edits if e.test == "insertion"),
            "joint_edits": sum(1 for e in edits if e.test == "joint"),
            "probes": self.store.count("probe"),
            "skipped": sum(skipped.values()),
            "findings": len(findings),
            "spurious": sum(1 for f in findings if f.spurious),
            "augmented_images": augmented.get("n_images") if isinstance(augmented, dict) else None,
            "skipped_reasons": [{"reason": r, "n": n} for r, n in skipped.most_common()],
            "not_grounded_reasons": [{"reason": r, "n": n} for r, n in not_grounded.most_common()],
        }

    def accuracy(self) -> dict[str, Any]:
        raw = self.store.get_meta("evaluation") or {}
        results: dict[str, Optional[EvalResult]] = {"before": None, "after": None}
        for stage in results:
            if isinstance(raw, dict) and raw.get(stage) is not None:
                try:
                    results[stage] = EvalResult.model_validate(raw[stage])
                except ValueError as e:
                    self.notes.append(f"evaluation {stage!r} is not a valid EvalResult ({short(str(e), 120)})")
        b, a = results["before"], results["after"]
        rows = []
        for key, label in (("worst_group_accuracy", "worst-group accuracy"), ("average_accuracy", "average accuracy"),
                           ("weighted_average_accuracy", "weighted average accuracy")):
            vb, va = (getattr(b, key) if b else None), (getattr(a, key) if a else None)
            rows.append({"metric": label, "key": key, "before": fmt_acc(vb), "after": fmt_acc(va),
                         "delta": fmt_delta(vb, va), "better": None if vb is None or va is None else va >= vb})
        groups = {}
        for stage, res in results.items():
            for g in (res.groups if res else []):
                groups.setdefault(g.key, {"key": g.key, "n": g.n, "before": "–", "after": "–"})[stage] = fmt_acc(g.accuracy)
        return {"available": b is not None or a is not None, "rows": rows, "groups": list(groups.values()),
                "worst_before": b.worst_group if b else None, "worst_after": a.worst_group if a else None,
                "split": (a or b).split if (a or b) else None,
                "raw": {k: (v.model_dump() if v else None) for k, v in results.items()}}

    def trail(self) -> list[dict[str, Any]]:
        events = [(e["event"], {k: v for k, v in e.items() if k != "event"})
                  for e in self.store.events() if e["event"] in TRAIL_EVENTS]
        if not any(event == "approval" for event, _ in events):  # approvals recorded only in the meta
            events += [("approval", dict(a)) for a in self.store.get_meta("approvals", []) or [] if isinstance(a, dict)]
        events.sort(key=lambda item: item[1].get("time") if isinstance(item[1].get("time"), (int, float)) else 0)
        out = []
        for i, (event, e) in enumerate(events, 1):
            fields = {k: short(e[k]) for k in TRAIL_FIELDS if e.get(k) not in (None, "", [])}
            details = [{"key": k, "value": short(v)} for k, v in e.items()
                       if k not in TRAIL_FIELDS and k != "time" and v not in (None, "", [])]
            t = e.get("time")
            out.append({"n": i, "time": fmt_time(t if isinstance(t, (int, float)) else None), "event": event,
                        "fields": fields, "details": details, "raw": {"event": event, **e}})
        return out

    def record(self) -> Optional[dict[str, Any]]:
        record = self.store.get_meta("record")
        if not isinstance(record, dict):
            return None
        config = record.get("config") if isinstance(record.get("config"), dict) else {}
        seeds = []

        def walk(obj: Any, prefix: str) -> None:
            for k, v in obj.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                elif k == "seed" and v is not None:
                    seeds.append({"key": f"{prefix}{k}", "value": str(v)})

        walk(config, "")
        try:  # the backends this run used and the models they load (not every concern's defaults)
            used = AspireConfig.model_validate(config).used_models(generated=bool(self.store.get_meta("augmented")))
        except ValidationError:  # a record of another version of aspire: its backends as recorded
            used = [(f"{concern}.{k}", str(v)) for concern, values in config.items() if isinstance(values, dict)
                    for k, v in values.items() if k.endswith("backend") and v]
        model_ids = [{"key": k, "value": v} for k, v in used]
        if record.get("seed") is not None:
            seeds.insert(0, {"key": "run seed", "value": str(record["seed"])})
        classifier = record.get("classifier") if isinstance(record.get("classifier"), dict) else None
        known = ("python", "platform", "packages", "prompts", "config", "seed", "classifier")
        return {
            "python": str(record.get("python", "")), "platform": str(record.get("platform", "")),
            "packages": [{"name": k, "version": str(v)} for k, v in (record.get("packages") or {}).items()],
            "prompts": [{"name": k, "hash": str(v)} for k, v in (record.get("prompts") or {}).items()],
            "model_ids": model_ids, "seeds": seeds,
            "classifier": [{"key": k, "value": short(v)} for k, v in (classifier or {}).items()],
            "extra": [{"key": k, "value": short(v, 600)} for k, v in record.items() if k not in known],
            "config_json": json.dumps(config, indent=2, sort_keys=True),
        }

    # ------------------------------------------------------------ generated images (augmented set)
    def generated(self) -> tuple[Optional[dict[str, Any]], dict[str, list[Path]], dict[str, list[Path]]]:
        """(summary of meta 'augmented', {edit id: generated images}, {class: generated images}), from the
        set's manifest.json (aspire/data/augmented.py: per image its img_filename, class and source edits)."""
        from aspire.data.augmented import read_manifest

        meta = self.store.get_meta("augmented")
        by_edit: dict[str, list[Path]] = defaultdict(list)
        by_class: dict[str, list[Path]] = defaultdict(list)
        if not isinstance(meta, dict):
            return None, by_edit, by_class
        manifest_path = meta.get("manifest")
        aug_dir = Path(str(manifest_path)).expanduser().parent if manifest_path else Path(str(meta.get("dir") or ""))
        try:
            images = read_manifest(aug_dir)["images"]
        except AspireError as e:
            self.notes.append(f"generated images are not shown: {e}")
            images = []
        for row in images:
            if not isinstance(row, dict) or not isinstance(row.get("img_filename"), str):
                continue
            path = aug_dir / row["img_filename"]
            for edit_id in row.get("edits") or []:
                by_edit[str(edit_id)].append(path)
            by_class[str(row.get("class", row.get("y", "?")))].append(path)
        generator = meta.get("generator")
        if isinstance(generator, dict):
            generator = " ".join(str(generator[k]) for k in ("name", "model_id") if generator.get(k))
        summary = {"dir": str(meta.get("dir") or aug_dir), "n_images": meta.get("n_images", len(images)),
                   "generator": short(generator or ""), "manifest": str(aug_dir / "manifest.json"),
                   "per_class": meta.get("per_class") if isinstance(meta.get("per_class"), dict) else {}}
        return summary, by_edit, by_class

    # ------------------------------------------------------------ galleries
    def galleries(self, findings: list[Finding], names: list[str],
                  generated_by_edit: dict[str, list[Path]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per finding (spurious first) up to max_examples edits, flipping ones first, with Grad-CAM."""
        # 1. pick the examples: the finding's real edits, flips first, then by the drop in the true class
        probes = [p for p in self.store.all("probe", Probe) if p.test == "removal"]  # the galleries show removals
        edits = {e.edit_id: e for e in self.store.all("edit", Edit)}
        controls = {p.pair_key: p for p in probes if p.control}
        data_root = (self.store.get_meta("args") or {}).get("data")
        chosen: list[tuple[Finding, list[Probe]]] = []
        for f in findings[:self.max_gallery_findings]:
            chosen.append((f, finding_edits(f, probes)))

        # 2. the images: original, edited, control, generated from the edit
        originals: dict[str, Optional[Image.Image]] = {}
        for _, mine in chosen:
            for p in mine[:self.max_examples]:
                if p.image not in originals:
                    originals[p.image] = open_image(Path(data_root) / p.image) if data_root else None

        # 3. Grad-CAM before and after retraining, on the originals
        cams, cam_info = self._gradcams(originals, {p.image: p.y for _, mine in chosen for p in mine[:self.max_examples]})

        out = []
        for f, mine in chosen:
            examples = []
            for i, p in enumerate(mine[:self.max_examples]):
                edit = edits.get(p.edit_id)
                ctrl = controls.get(p.pair_key)
                ctrl_edit = edits.get(ctrl.edit_id) if ctrl else None
                examples.append({
                    "edit_id": p.edit_id, "image": p.image, "flipped": p.flipped,
                    "original": self._thumb(originals.get(p.image), f"original {p.image}"),
                    "edited": self._thumb_path(edit.edited_png if edit else None, f"edited: {p.phrase} ({p.kind})"),
                    "control": self._thumb_path(ctrl_edit.edited_png if ctrl_edit else None, "control edit"),
                    "generated": self._generated(generated_by_edit.get(p.edit_id, []), i),
                    "cam_before": cams["before"].get(p.image), "cam_after": cams["after"].get(p.image),
                    "pred_original": self._name(names, p.pred_original), "pred_edited": self._name(names, p.pred_edited),
                    "prob_true_original": f"{p.prob_true_original:.2f}", "prob_true_edited": f"{p.prob_true_edited:.2f}",
                    "control_pred": self._name(names, ctrl.pred_edited) if ctrl else None,
                    "control_kind": ctrl.control_kind if ctrl else None,
                    "paired_drop": (f"{p.prob_drop - ctrl.prob_drop:+.2f}" if ctrl else None),
                    "control_flipped": ctrl.flipped if ctrl else None,
                    "instruction": edit.instruction if edit else None,
                    "donor": _donor_line(edit), "control_donor": _donor_line(ctrl_edit),
                })
            out.append({"finding": f, "examples": examples, "n_edits": len(mine)})
        return out, cam_info

    def _generated(self, paths: list[Path], i: int) -> list[Img]:
        """Up to max_generated of an edit's generated images; the i-th example of a finding starts further on
        (a class-level generator such as textual inversion maps every image to all of the class's edits)."""
        if not paths:
            return []
        start = (i * self.max_generated) % len(paths)
        picked = (paths[start:] + paths[:start])[:self.max_generated]
        return [img for img in (self._thumb_path(str(g), "generated from this edit") for g in picked) if img is not None]

    def _thumb(self, im: Optional[Image.Image], alt: str) -> Optional[Img]:
        return None if im is None else self.assets.image(im, alt)

    def _thumb_path(self, path: Optional[str], alt: str) -> Optional[Img]:
        return self._thumb(open_image(self._resolve(path)), alt)

    def _gradcams(self, originals: dict[str, Optional[Image.Image]],
                  classes: dict[str, int]) -> tuple[dict[str, dict[str, Img]], dict[str, Any]]:
        models = self.store.get_meta("models") or {}
        models = models if isinstance(models, dict) else {}
        args = self.store.get_meta("args") or {}
        paths = {"before": models.get("before") or args.get("model"), "after": models.get("after")}
        info: dict[str, Any] = {"before": paths["before"], "after": paths["after"], "before_note": None,
                                "after_note": None}
        if not paths["after"]:
            info["after_note"] = ("no retrained model in this run (meta 'models' has no 'after'): "
                                  "Grad-CAM shows the audited classifier only")
        if not paths["before"]:
            info["before_note"] = "no classifier checkpoint recorded in this run: no Grad-CAM"
        cams: dict[str, dict[str, Img]] = {"before": {}, "after": {}}
        keys = [k for k, im in originals.items() if im is not None]
        for stage, ckpt in paths.items():
            if not ckpt or not keys:
                continue
            try:
                from aspire.report.gradcam import GradCam

                overlays = GradCam(ckpt, device=self.device).overlays([originals[k] for k in keys],
                                                                      [classes[k] for k in keys])
            except (AspireError, ImportError, RuntimeError) as e:
                info[f"{stage}_note"] = f"Grad-CAM of the {stage} model failed: {short(str(e), 200)}"
                continue
            for k, im in zip(keys, overlays):
                cams[stage][k] = self.assets.image(im, f"Grad-CAM {stage} retraining")
        return cams, info

    def reprobe(self, findings: list[Finding], rows: list[dict]) -> Optional[dict[str, Any]]:
        """The findings confirmed before or after the repair, re-probed on the new model (None: not re-probed)."""
        meta = self.store.get_meta("reprobe") or {}
        mine = [(f, r) for f, r in zip(findings, rows) if f.after is not None and f.after.verdict]
        if not meta or not any(f.after for f in findings):
            return None
        from aspire.report.plots import effect_change_chart

        table = [{**r, "after_effect_s": f"{f.after.effect:+.3f}",
                  "after_effect_ci_s": f"[{f.after.effect_ci[0]:+.3f}, {f.after.effect_ci[1]:+.3f}]",
                  "after_q_value_s": fmt_p(f.after.q_value), "after_flip_rate_s": fmt_rate(f.after.flip_rate),
                  "reduction_q_value_s": fmt_p(f.after.reduction_q_value), "verdict": f.after.verdict}
                 for f, r in mine]
        chart = None
        if mine:
            chart = self.assets.png(effect_change_chart([f for f, _ in mine][:40]),
                                    "effect before and after the repair per finding", "effect_change.png")
        return {"model": meta.get("model"), "verdicts": meta.get("verdicts", {}), "rows": table, "chart": chart}

    # ------------------------------------------------------------ context and output
    def context(self) -> dict[str, Any]:
        """Everything the templates and the JSON show, as plain values and `Img`s."""
        # 1. the run
        args = self.store.get_meta("args") or {}
        findings = self.findings()
        names = self._class_names(findings)
        kind = self.store.get_meta("kind") or "run"
        # 2. sections
        augmented, by_edit, by_class = self.generated()
        galleries, cam_info = self.galleries(findings, names, by_edit)
        gallery_ids = {id(g["finding"]) for g in galleries}
        rows = []
        for i, f in enumerate(findings, 1):
            rows.append({**f.to_json(), "id": f"finding-{i}", "n": i, "has_gallery": id(f) in gallery_ids,
                         "flip_rate_s": fmt_rate(f.flip_rate), "control_flip_rate_s": fmt_rate(f.control_flip_rate),
                         "p_value_s": fmt_p(f.p_value), "mean_prob_drop_s": fmt_rate(f.mean_prob_drop),
                         "q_value_s": fmt_p(f.q_value), "flip_p_value_s": fmt_p(f.flip_p_value),
                         "effect_s": f"{f.effect:+.3f}", "effect_ci_s": f"[{f.effect_ci[0]:+.3f}, {f.effect_ci[1]:+.3f}]",
                         "joint_effect_s": "–" if f.joint_effect is None else f"{f.joint_effect:+.3f}",
                         "joint_q_value_s": fmt_p(f.joint_q_value)})
        row_of = {id(f): r for f, r in zip(findings, rows)}
        for g in galleries:
            g["row"] = row_of[id(g.pop("finding"))]
        chart = None
        if findings:
            from aspire.report.plots import flip_rate_chart

            chart = self.assets.png(flip_rate_chart(findings[:40]), "flip rate vs control flip rate per finding",
                                    "flip_rates.png")
            if len(findings) > 40:
                self.notes.append(f"the chart shows the first 40 of {len(findings)} findings")
        reprobe = self.reprobe(findings, rows)
        if augmented is not None:
            augmented["samples"] = [{"class": c, "images": [im for im in (self._thumb_path(str(p), f"generated {c}")
                                                                          for p in ps[:6]) if im is not None]}
                                    for c, ps in sorted(by_class.items())]
        if len(findings) > len(galleries):
            self.notes.append(f"galleries show the first {len(galleries)} of {len(findings)} findings")
        return {
            "title": f"ASPIRE {kind} report",
            "generated": fmt_time(time.time()),
            "run": {"dir": str(self.run_dir), "kind": kind, "data": args.get("data"), "format": args.get("format"),
                    "model": args.get("model"), "classes": args.get("classes") or "all", "seed": args.get("seed"),
                    "args": [{"key": k, "value": short(v)} for k, v in args.items()]},
            "class_names": names,
            "findings": rows,
            "galleries": galleries,
            "gradcam": cam_info,
            "chart": chart,
            "accuracy": self.accuracy(),
            "reprobe": reprobe,
            "augmented": augmented,
            "trail": self.trail(),
            "counts": self.counts(findings),
            "record": self.record(),
            "notes": self.notes,
            "max_examples": self.max_examples,
        }

    def write(self, out_dir: Optional[str | Path] = None) -> dict[str, Path]:
        """Render and write report.html, report.md, report.json and img/ (each file atomically)."""
        out = Path(out_dir).expanduser() if out_dir else self.run_dir / "report"
        ctx = self.context()
        html = template_env(html=True).get_template("report.html.j2").render(**ctx)
        md = template_env(html=False).get_template("report.md.j2").render(**ctx)
        # 1. images first, so no document links to a missing file; then the documents
        for name, data in self.assets.files.items():
            target = out / "img" / name
            if not (target.is_file() and target.read_bytes() == data):
                write_bytes(target, data)
        for stale in (out / "img").glob("*"):  # images of an earlier report of this run
            if stale.name not in self.assets.files and ASSET_NAME.fullmatch(stale.name):
                stale.unlink()
        paths = {"html": out / "report.html", "md": out / "report.md", "json": out / "report.json"}
        write_text(paths["html"], html)
        write_text(paths["md"], md)
        write_json(paths["json"], _summary(ctx, self.store, {k: str(v) for k, v in paths.items()},
                                           sorted(self.assets.files)))
        return paths

    def close(self) -> None:
        self.store.close()


# ---------------------------------------------------------------- helpers
def _donor_line(edit: Optional[Edit]) -> Optional[str]:
    """Where a background change took its background from: `<image key> (<its background>)`."""
    if edit is None or not edit.donor:
        return None
    if edit.donor == edit.image:
        return "its own background"
    return f"{edit.donor}" + (f" ({edit.donor_background})" if edit.donor_background else "")


def _summary(ctx: dict[str, Any], store: RunStore, paths: dict[str, str], images: list[str]) -> dict[str, Any]:
    examples = {g["row"]["id"]: plain(g["examples"]) for g in ctx["galleries"]}
    findings = []
    for row in ctx["findings"]:
        f = {k: v for k, v in row.items() if not k.endswith("_s") and k not in ("id", "n", "has_gallery")}
        findings.append({**f, "examples": examples.get(row["id"], [])})
    return {
        "run": {"dir": ctx["run"]["dir"], "kind": ctx["run"]["kind"], "args": store.get_meta("args")},
        "generated": ctx["generated"],
        "findings": findings,
        "accuracy": ctx["accuracy"]["raw"],
        "reprobe": None if ctx["reprobe"] is None else {k: ctx["reprobe"][k] for k in ("model", "verdicts")},
        "gradcam": ctx["gradcam"],
        "augmented": plain(ctx["augmented"]),
        "counts": ctx["counts"],
        "trail": [t["raw"] for t in ctx["trail"]],
        "record": store.get_meta("record"),
        "notes": ctx["notes"],
        "paths": {**paths, "chart": plain(ctx["chart"]), "images": [f"img/{n}" for n in images]},
    }
