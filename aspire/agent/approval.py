"""The audit's approval: what the graph's interrupts show (`finding_summary`, `edits_to_use`, which findings
`qualifies_for_repair` proposes), how an answer is read (`parse_decision`, `resolve_feature`) and recorded
(`record_approval`), and the terminal prompt of `aspire audit` (`terminal_approver`): approve / drop N /
add "class:phrase" / reject, with the findings and the cost of what would run next."""

from __future__ import annotations

import shlex
import time
from collections import defaultdict
from typing import Any, Callable, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from aspire.schemas import Finding

DECISIONS = ("approve", "edit", "reject")


# ---------------------------------------------------------------- the decision
def finding_summary(n: int, f: Finding) -> dict:
    return {"n": n, "key": f.key, "class": f.class_, "class_index": f.class_index, "phrase": f.phrase,
            "kind": f.kind, "occurrences": f.occurrences, "flips": f.flips, "flip_rate": round(f.flip_rate, 3),
            "control_flip_rate": round(f.control_flip_rate, 3), "p_value": f.p_value, "spurious": f.spurious,
            "effect": round(f.effect, 4), "effect_ci": [round(v, 4) for v in f.effect_ci], "q_value": f.q_value,
            "control_kind": f.control_kind, "edits": len(f.evidence_edits)}


def edits_to_use(findings: list[dict], selected: list[str], cap_per_class: int) -> dict[str, int]:
    """Edits generation would use, per class (capped at probe.max_edits_per_class)."""
    per_class: dict[str, int] = defaultdict(int)
    for f in findings:
        if f["key"] in selected:
            per_class[f["class"]] += f["edits"]
    return {c: min(n, cap_per_class) for c, n in sorted(per_class.items())}


def parse_decision(answer: Any) -> dict:
    """A resume value as {decision, drop, add}: "approve", "reject", or a dict with those keys."""
    if isinstance(answer, str):
        answer = {"decision": answer}
    if not isinstance(answer, dict):
        return {"decision": "reject", "drop": [], "add": [], "note": f"unreadable answer {answer!r}: rejected"}
    decision = str(answer.get("decision", "approve")).lower()
    decision = {"yes": "approve", "y": "approve", "no": "reject", "n": "reject"}.get(decision, decision)
    if decision not in DECISIONS:
        return {"decision": "reject", "drop": [], "add": [], "note": f"unknown decision {decision!r}: rejected"}
    return {"decision": decision, "drop": list(answer.get("drop") or []), "add": list(answer.get("add") or []),
            "auto": bool(answer.get("auto", False))}


def resolve_feature(ref: Any, findings: list[Finding], class_names: list[str]) -> Optional[Finding]:
    """A finding named by a key ("1|foreground|boat"), "class:phrase", or its 1-based number."""
    if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
        i = int(ref) - 1
        return findings[i] if 0 <= i < len(findings) else None
    ref = str(ref).strip().strip("'\"")
    by_key = {f.key: f for f in findings}
    if ref in by_key:
        return by_key[ref]
    if ":" not in ref:
        return None
    cls, phrase = (part.strip().strip("'\"") for part in ref.split(":", 1))
    y = class_names.index(cls) if cls in class_names else (int(cls) if cls.isdigit() else None)
    phrase = phrase.lower()
    pool = [f for f in findings if f.class_index == y]
    return next((f for f in pool if f.phrase == phrase), None) or next((f for f in pool if phrase in f.phrases), None)


def record_approval(store, stage: str, decision: dict, dropped: list[str], added: list[str]) -> dict:
    """meta "approvals" (one entry per stage, replaced on a re-run) and one `approval` event per stage."""
    entry = {"stage": stage, "decision": decision["decision"], "dropped": dropped, "added": added,
             "auto": decision.get("auto", False), "time": time.time(),
             "reason": decision.get("note") or _approval_reason(stage, decision, dropped, added)}
    approvals = [a for a in store.get_meta("approvals", []) or [] if a.get("stage") != stage]
    store.set_meta("approvals", approvals + [entry])
    store.log_event_once("approval", {k: v for k, v in entry.items() if k != "time"}, ("stage",))
    return entry


def _approval_reason(stage: str, decision: dict, dropped: list[str], added: list[str]) -> str:
    who = "automatically (--yes)" if decision.get("auto") else "by the user"
    if decision["decision"] == "reject":
        return f"rejected {who}: no {'generation or retraining' if stage == 'generate' else 'retraining'}"
    if decision["decision"] == "edit":
        return f"approved {who} with {len(dropped)} feature(s) dropped and {len(added)} added"
    return f"approved {who} as proposed"


def qualifies_for_repair(f: Finding, config) -> bool:
    """Whether generation would use a finding's flipped edits, as augment.select says (spurious by default)."""
    mode = config.augment.select
    if not f.evidence_edits:
        return False
    if mode == "significant":
        return f.q_value < config.probe.alpha or (f.joint_q_value or 1.0) < config.probe.alpha
    return f.spurious if mode == "spurious" else True


# ---------------------------------------------------------------- the terminal prompt
def terminal_approver(console: Console, ask: Optional[Callable[[str], str]] = None) -> Callable[[dict], dict]:
    """An `approve(payload)` for run_audit that asks in the terminal: approve / drop N / add "class:phrase" / reject."""
    ask = ask or (lambda prompt: console.input(Text(prompt, style="bold")))

    def approve(payload: dict) -> dict:
        if payload.get("stage") == "generate":
            return _approve_generation(console, ask, payload)
        return _approve_simple(console, ask, payload)

    return approve


def _approve_generation(console: Console, ask: Callable[[str], str], payload: dict) -> dict:
    findings = payload["findings"]
    by_n = {f["n"]: f for f in findings}
    proposed = list(payload["proposed"])
    selected = list(proposed)
    while True:
        table = Table(title="findings (✓ = repaired by generation)", title_justify="left")
        for c in ("#", "", "class", "phrase", "kind", "edits", "effect [95% CI]", "q", "flip rate", "control"):
            table.add_column(c)
        shown = [f for f in findings if f["spurious"] or f["key"] in selected][:40] or findings[:10]
        for f in shown:
            lo, hi = f["effect_ci"]
            table.add_row(str(f["n"]), "✓" if f["key"] in selected else "", f["class"], f["phrase"], f["kind"],
                          str(f["occurrences"]), f"{f['effect']:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                          f"{f['q_value']:.2g}", f"{f['flip_rate']:.2f}", f"{f['control_flip_rate']:.2f}")
        console.print(table)
        cost = payload.get("cost", {})
        retrain = cost.get("retrain", {})
        use = edits_to_use(findings, selected, payload.get("max_edits_per_class", 35))
        per_class = cost.get("images_per_class")
        images = per_class * sum(1 for n in use.values() if n) if per_class else cost.get("images_to_generate")
        console.print(f"cost: {sum(use.values())} edits to generate from "
                      f"({', '.join(f'{c} {n}' for c, n in use.items()) or 'none'}); "
                      f"{'images to generate: ' + str(images) if images is not None else 'images: as augment is set'}; "
                      f"then retraining {retrain.get('method', '?')} for {retrain.get('epochs', '?')} epochs on "
                      f"{retrain.get('train_images', '?')} training images", highlight=False)
        answer = ask("approve / drop N / add \"class:phrase\" / reject [approve]: ").strip()
        word, _, rest = answer.partition(" ")
        word = word.lower() or "approve"
        if word in ("approve", "a", "yes", "y"):
            dropped = [k for k in proposed if k not in selected]
            added = [k for k in selected if k not in proposed]
            return {"decision": "edit" if dropped or added else "approve", "drop": dropped, "add": added}
        if word in ("reject", "r", "no", "n"):
            return {"decision": "reject"}
        if word in ("drop", "add") and rest.strip():
            refs = [r for r in shlex.split(rest.replace(",", " "))]
            for ref in refs:
                f = by_n.get(int(ref)) if ref.isdigit() else _by_name(findings, ref)
                if f is None:
                    console.print(f"[red]no finding {ref!r}[/red] (use its # or \"class:phrase\")", highlight=False)
                elif word == "drop" and f["key"] in selected:
                    selected.remove(f["key"])
                elif word == "add" and f["key"] not in selected:
                    selected.append(f["key"])
            continue
        console.print("answer approve, drop N, add \"class:phrase\" (or add N), or reject", highlight=False)


def _by_name(findings: list[dict], ref: str) -> Optional[dict]:
    if ":" not in ref:
        return None
    cls, phrase = (p.strip().lower() for p in ref.split(":", 1))
    return next((f for f in findings if f["class"].lower() == cls and f["phrase"] == phrase), None)


def _approve_simple(console: Console, ask: Callable[[str], str], payload: dict) -> dict:
    cost = payload.get("cost", {})
    aug = payload.get("augmented") or {}
    console.print(f"{payload.get('question', 'continue?')} {aug.get('n_images', '?')} generated images "
                  f"({', '.join(f'{c} {n}' for c, n in (aug.get('per_class') or {}).items())}); retraining "
                  f"{cost.get('method', '?')} for {cost.get('epochs', '?')} epochs on "
                  f"{cost.get('train_images', '?')} training images", highlight=False)
    while True:
        word = ask("approve / reject [approve]: ").strip().lower() or "approve"
        if word in ("approve", "a", "yes", "y"):
            return {"decision": "approve"}
        if word in ("reject", "r", "no", "n"):
            return {"decision": "reject"}
