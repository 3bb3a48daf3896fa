"""Step 5.1, selection: per class, the flipped edits to generate from (or, generic mode, hold-out images)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Optional, Sequence


from aspire.config import AspireConfig
from aspire.errors import ConfigError, DataError
from aspire.schemas import Edit, Finding, Sample
from aspire.store import RunStore
from aspire.tools.generate import derive_seed
from aspire.tools.probe import rank_key

@dataclass
class ClassSelection:
    """One class's flipped edits to generate from, and the phrase groups its backgrounds must not show."""

    class_index: int
    class_name: str
    groups: list[str]
    edits: list[Edit]
    avoid: list[Finding]
    originals: list[str] = field(default_factory=list)  # generic mode: hold-out image keys (no edits, no groups)


def select_edits(store: RunStore, class_names: Sequence[str], class_ids: Sequence[int], config: AspireConfig,
                 groups: Optional[Collection[str]] = None) -> tuple[list[ClassSelection], dict[str, str]]:
    """Per class, the flipped edits of its qualifying groups, strongest first, up to max_edits_per_class.
    `groups` (finding keys, e.g. the agent's approved features) replaces `augment.select` when given."""
    mode, limit = ("given" if groups is not None else config.augment.select), config.probe.max_edits_per_class
    if mode == "generic":
        raise ConfigError("augment.select = generic uses hold-out images, not edits (select_originals)")
    chosen = set(groups or ())
    findings = store.all("finding", Finding)
    selections, skipped = [], {}
    for y in class_ids:
        name = class_names[y]
        mine = sorted((f for f in findings if f.class_index == y), key=rank_key)
        qualifies = {"spurious": lambda f: f.spurious,
                     "significant": lambda f: min(f.q_value, f.joint_q_value or 1.0) < config.probe.alpha,
                     "flipping": lambda f: bool(f.flipped_edits), "given": lambda f: f.key in chosen}[mode]
        top = [f for f in mine if qualifies(f) and f.evidence_edits]
        if not top:
            what = {"spurious": "no spurious phrase group", "significant": "no phrase group flipping significantly "
                    "more often than its controls", "flipping": "no phrase group",
                    "given": "none of the chosen phrase groups"}[mode]
            rule = "chosen groups" if mode == "given" else f"augment.select = {mode}"
            skipped[name] = (f"{what} with edits that lower the class's probability ({rule}; {len(mine)} groups probed)"
                             if mine else "no findings: the class was not probed in this run")
            continue
        edits: list[Edit] = []
        used: list[str] = []
        for f in top:
            if len(edits) >= limit:
                break
            used.append(f.phrase)
            for edit_id in f.evidence_edits:
                if len(edits) >= limit:
                    break
                edit = store.get("edit", edit_id, Edit)
                if edit is None or edit.control or any(e.edit_id == edit_id for e in edits):
                    continue
                if not Path(edit.edited_png).is_file():
                    raise DataError(f"{edit.edited_png}: edited image of edit {edit_id} is missing from the run")
                edits.append(edit)
        if not edits:
            skipped[name] = f"the flipped edits of {', '.join(used)} are missing from the run store"
            continue
        avoid = {f.phrase: f for f in mine if f.spurious}
        avoid.update({f.phrase: f for f in top if f.phrase in used})
        selections.append(ClassSelection(y, name, used, edits, list(avoid.values())))
    return selections, skipped


def select_originals(store: RunStore, samples: dict[str, Sample], class_names: Sequence[str],
                     class_ids: Sequence[int], config: AspireConfig,
                     seed: int) -> tuple[list[ClassSelection], dict[str, str]]:
    """Generic mode: per class, up to max_edits_per_class of its hold-out images in a seeded order (no edits,
    no phrase groups, nothing to avoid)."""
    holdout = [samples[k] for k in store.get_meta("holdout", []) if k in samples]
    selections, skipped = [], {}
    for y in class_ids:
        keys = sorted(s.image for s in holdout if s.y == y)
        if not keys:
            skipped[class_names[y]] = "no hold-out images: the class was not probed in this run"
            continue
        random.Random(derive_seed(seed, "generic", y)).shuffle(keys)
        selections.append(ClassSelection(y, class_names[y], [], [], [], keys[:config.probe.max_edits_per_class]))
    return selections, skipped
