"""The terminal approval prompt of `aspire audit`: at each interrupt of the graph, approve / drop N /
add "class:phrase" / reject, with the findings and the cost of what would run next."""

from __future__ import annotations

import shlex
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text


def terminal_approver(console: Console, ask: Optional[Callable[[str], str]] = None) -> Callable[[dict], dict]:
    """An `approve(payload)` for run_audit that asks in the terminal: approve / drop N / add "class:phrase" / reject."""
    ask = ask or (lambda prompt: console.input(Text(prompt, style="bold")))

    def approve(payload: dict) -> dict:
        if payload.get("stage") == "generate":
            return _approve_generation(console, ask, payload)
        return _approve_simple(console, ask, payload)

    return approve


def _approve_generation(console: Console, ask: Callable[[str], str], payload: dict) -> dict:
    from aspire.agent.nodes import edits_to_use

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
