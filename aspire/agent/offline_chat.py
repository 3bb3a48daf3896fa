"""`aspire chat` without an LLM: a conversation about one run that answers free questions from the run's tools.

    OfflineSession(tools, console).run()

A question is mapped onto what the run can answer by what it names (a class, a finding's phrase, "strongest")
and by its intent: what was found, why the model calls images a class, the evidence for a finding, testing a
concept now, comparing classes, what to do next, a summary. The answers are sentences with the numbers and the
image paths; in a colour terminal the evidence comes with thumbnails (original, edited, control) drawn with
half-block characters. The offline commands (`findings`, `stats`, `edits`, `probe`, `approve`, `summary`) work
as words too. The intents are read from a few English words: this is the fallback for a session without an
LLM; with one configured, `aspire chat` talks through agent/chat.py instead, over the same tools.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.text import Text

from aspire.agent.terminal import CONFIGURE_HELP, chat_loop, thumbnails
from aspire.agent.tools import RunTools
from aspire.schemas import Finding
from aspire.tools import lexicon

HELP = """Ask in your own words, for example:
  what did you find?                     why does the model call this a <class>?
  show me the evidence for <phrase>      show me the evidence for the strongest finding
  test whether the model relies on <x>   compare <class> and <class>
  what should I do next?                 summary
or use the commands: findings [CLASS], stats CLASS, edits PHRASE [CLASS], probe CLASS PHRASE, approve, help, quit"""

# intent: words that say it (the first intent whose words appear wins; order matters)
INTENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("help", ("help", "what can you", "how do i use")),
    ("approve", ("approve",)),
    ("test", ("test", "check whether", "check if", "rely on", "relies on", "depend on", "depends on")),
    ("compare", ("compare", " vs ", "versus", "differ", "difference between")),
    ("evidence", ("evidence", "show", "example", "image", "picture", "proof", "prove", "edits")),
    ("why", ("why", "because", "reason")),
    ("next", ("next", "should i", "what now", "fix", "repair", "improve", "retrain")),
    ("summary", ("summary", "summarise", "summarize", "status", "overview", "what is this run")),
    ("found", ("find", "found", "spurious", "shortcut", "result", "learn", "rely", "wrong", "stats")),
)
# the words that introduce a concept: "relies on the sky", "test the water", "evidence for grass"; it ends at
# one of END (or the end of the question)
CUES = re.compile(r"\b(?:relies on|rely on|depends on|depend on|uses|use|using|evidence for|evidence of|about|test|"
                  r"check|probe|for|of|on)\b")
END = re.compile(r"\s(?:in|for|on|when|with|of|to)\s|[?.!,]")
STOP = {"the", "a", "an", "model", "classifier", "it", "this", "that", "them", "whether", "if", "me", "you", "strongest",
        "finding", "findings", "feature", "features", "spurious", "class", "images", "image", "reliance", "does",
        "do", "is", "really", "much"}


class OfflineSession:
    """The conversation over RunTools, answered in sentences; every turn is logged as a `chat` event."""

    def __init__(self, tools: RunTools, console: Optional[Console] = None):
        self.tools = tools
        self.console = console or Console()
        self._pictures: list[tuple[str, Optional[str]]] = []   # (label, path) drawn below the current answer

    def run(self) -> int:
        self.console.print(CONFIGURE_HELP, highlight=False)
        self.console.print("Without an LLM I answer from the run's evidence. " + HELP, highlight=False)
        return chat_loop(self.console, self.command)

    def command(self, line: str, log_question: bool = True) -> str:
        """Answer one question or command (printed, logged, and returned)."""
        if log_question:
            self.tools.store.log_event("chat", {"role": "user", "content": line, "offline": True})
        intent, args = self.understand(line)
        self._pictures = []
        answer = getattr(self, f"_{intent}")(**args)
        if answer:
            self.say(answer)
            self.tools.store.log_event("chat", {"role": "assistant", "content": answer, "offline": True})
        if self._pictures and self._can_draw():
            self.console.print(thumbnails(self._pictures))
        return answer

    def say(self, text: str) -> None:
        self.console.print(Text("aspire> ", style="bold green") + Text(text), soft_wrap=True)

    # ------------------------------------------------------------ understanding
    def understand(self, line: str) -> tuple[str, dict]:
        """(intent, its arguments) of a question or command."""
        text = " " + " ".join(line.lower().replace("’", "'").split()) + " "
        words = text.split()
        classes = self._classes_named(text)
        finding = self._finding_named(text, classes)
        first = words[0] if words else ""
        if first in ("findings", "spurious"):
            return "found", {"classes": classes}
        if first == "stats":
            return ("stats", {"class_name": classes[0]}) if classes else ("no_class", {"words": words[1:]})
        if first == "edits" and len(words) > 1:
            return "evidence", {"finding": finding, "phrase": self._rest(words[1:], classes), "classes": classes}
        if first == "probe" and len(words) > 1:
            return "test", {"phrase": self._rest(words[1:], classes), "classes": classes}
        if first == "summary":
            return "summary", {}
        intent = next((name for name, cues in INTENTS if any(re.search(rf"\b{re.escape(cue)}\b", text) for cue in cues)),
                      None)
        if intent == "test":
            return "test", {"phrase": finding.phrase if finding else self._concept(text, classes), "classes": classes}
        if intent == "evidence":
            strongest = any(w in text for w in ("strongest", "top", "biggest", "main", "worst"))
            return "evidence", {"finding": finding if finding or not strongest else self.tools.finding_for(
                None, classes[0] if classes else None), "phrase": self._concept(text, classes), "classes": classes}
        if intent in ("compare", "found"):
            return intent, {"classes": classes}
        if intent == "why":
            return ("why", {"class_name": classes[0]}) if classes else ("found", {"classes": []})
        if intent is not None:
            return intent, {}
        if finding is not None:   # a question that names a finding: its evidence; a class: why
            return "evidence", {"finding": finding, "phrase": None, "classes": classes}
        return ("why", {"class_name": classes[0]}) if classes else ("unknown", {"line": line})

    def _classes_named(self, text: str) -> list[str]:
        """The run's classes a text names (by name, head noun or plural), in the order it names them."""
        heads = [lexicon.head(n) for n in self.tools.class_names]
        found = []
        for name, head in zip(self.tools.class_names, heads):
            forms = {lexicon.normalize(name), lexicon.normalize(name.replace("_", " "))} - {""}
            if head and heads.count(head) == 1:   # "bird" names a class only if no other class is a bird
                forms.add(head)
            spots = [m.start() for form in forms
                     for m in re.finditer(rf"\b{re.escape(form)}(?:e?s)?\b", text)]
            if spots:
                found.append((min(spots), name))
        return [name for _, name in sorted(found)]

    def _finding_named(self, text: str, classes: list[str]) -> Optional[Finding]:
        """The finding whose phrase (or a member phrase) the text names, longest phrase first; of a named class
        when there is one."""
        best: Optional[tuple[int, Finding]] = None
        for f in self.tools.findings_list():
            if classes and f.class_ not in classes:
                continue
            for phrase in (f.phrase, *f.phrases):
                hit = re.search(rf"\b{re.escape(phrase)}(?:e?s)?\b", text)
                if hit and (best is None or (len(phrase), f.spurious) > (best[0], best[1].spurious)):
                    best = (len(phrase), f)
        return best[1] if best else None

    def _concept(self, text: str, classes: list[str]) -> Optional[str]:
        """The thing a question asks about when no finding names it: "test whether the model relies on the sky"
        -> "sky". The words after the last cue that leaves some, up to the next preposition or the end."""
        class_words = {w for c in classes for w in (lexicon.normalize(c), lexicon.head(c))}
        for cue in sorted(CUES.finditer(text), key=lambda m: -m.end()):
            tail = text[cue.end():]
            end = END.search(tail)
            words = [w for w in (tail[:end.start()] if end else tail).split()
                     if w not in STOP and lexicon.normalize(w) not in class_words]
            if words:
                return lexicon.normalize(" ".join(words))
        return None

    def _rest(self, words: list[str], classes: list[str]) -> str:
        """A command's phrase: its words other than a class name, in either order (`edits water waterbird`)."""
        names = {lexicon.normalize(c) for c in classes} | {lexicon.head(c) for c in classes}
        rest = [w.strip("'\"") for w in words if lexicon.normalize(w) not in names]
        return " ".join(rest) or " ".join(words)

    # ------------------------------------------------------------ the answers
    def _help(self) -> str:
        return HELP

    def _no_class(self, words: list[str]) -> str:
        return (f"{' '.join(words) or 'That'!r} is not a class of this run; its classes are "
                f"{', '.join(self.tools.class_names)}.")

    def _unknown(self, line: str) -> str:
        return (f"I cannot tell what {line.strip()!r} asks about: it names no class of this run "
                f"({', '.join(self.tools.class_names)}) and no finding. " + HELP.splitlines()[0])

    def _found(self, classes: list[str]) -> str:
        findings = [f for f in self.tools.findings_list() if not classes or f.class_ in classes]
        spurious = [f for f in findings if f.spurious]
        scope = f" for {', '.join(classes)}" if classes else ""
        if not findings:
            return f"Nothing was probed{scope} yet: run `aspire probe` or `aspire audit` on this model first."
        if not spurious:
            top = findings[0]
            return (f"I tested {len(findings)} phrase groups{scope} and confirmed none as spurious. The strongest "
                    f"candidate: {describe(top)}")
        lines = [f"I tested {len(findings)} phrase groups{scope}; {len(spurious)} are spurious features the model "
                 "relies on:"]
        lines += [f"  {i}. {describe(f)}" for i, f in enumerate(spurious[:8], 1)]
        if len(spurious) > 8:
            lines.append(f"  ... and {len(spurious) - 8} more (`findings` lists them all).")
        return "\n".join(lines)

    def _why(self, class_name: str) -> str:
        mine = [f for f in self.tools.findings_list() if f.class_ == class_name]
        spurious = [f for f in mine if f.spurious]
        if not mine:
            return f"Class {class_name!r} was not probed in this run."
        if not spurious:
            return (f"No feature of {class_name} was confirmed as spurious: of {len(mine)} tested, the strongest is "
                    f"{describe(mine[0])} So as far as this run can tell, the model looks at the {class_name} "
                    "itself.")
        names = ", ".join(f"{f.phrase} ({f.kind})" for f in spurious[:4])
        lines = [f"Not only because of the {class_name} itself: the model also relies on {names}."]
        lines += [f"  - {describe(f)}" for f in spurious[:4]]
        return "\n".join(lines)

    def _evidence(self, finding: Optional[Finding], phrase: Optional[str], classes: list[str]) -> str:
        f = finding or (self.tools.finding_for(phrase, classes[0] if classes else None) if phrase else None)
        if f is None:
            what = repr(phrase) if phrase else "that"
            return (f"No finding names {what}. Ask `test whether the model relies on {phrase or '...'}` to probe it "
                    "now, or `what did you find?` for the findings.")
        res = self.tools.edits(f.phrase, f.class_, limit=3)
        data_root = (self.tools.store.get_meta("args") or {}).get("data")
        lines = [describe(f), f"Its {res['n_edits']} edits ({res['n_flipped']} flip the prediction), strongest first:"]
        for e in res["edits"]:
            original = str(Path(data_root) / e["image"]) if data_root else e["image"]
            verdict = "flipped" if e["flipped"] else "kept"
            lines.append(f"  - {e['image']}: P({f.class_}) {e['prob_true_before']:.2f} -> {e['prob_true_after']:.2f}"
                         f" ({verdict}); " + ("no control" if e["control_kind"] is None else
                                              f"control ({e['control_kind']}): "
                                              f"{'flipped' if e['control_flipped'] else 'kept'}"))
            lines.append(f"      original {original}\n      edited   {e['edited_png']}\n      control  "
                         f"{e['control_png'] or '-'}" + (f"\n      background from {e['donor']}" if e['donor'] else ""))
        if res["edits"]:   # drawn below the answer in a colour terminal
            e = res["edits"][0]
            self._pictures = [("original", str(Path(data_root) / e["image"]) if data_root else None),
                              ("edited", e["edited_png"]), ("control", e["control_png"])]
        return "\n".join(lines)

    def _test(self, phrase: Optional[str], classes: list[str]) -> str:
        if not phrase:
            return "Test what? Name it: `test whether the model relies on <something>` (add a class to test only it)."
        targets = classes or self._classes_with(phrase)
        lines = []
        for name in targets:
            self.console.print(f"[dim]testing {phrase!r} on {name} ...[/dim]", highlight=False)
            res = self.tools.probe(name, phrase)
            if res["result"] == "not found":
                lines.append(f"{name}: I could not test {phrase!r}: {res['why']}")
            elif res["result"] == "not probed":
                lines.append(f"{name}: {phrase!r} could not be tested: {res['why']}.")
            else:
                f = self.tools.finding_for(res["phrase"], name)
                lines.append(describe(f) if f else f"{name}: {res['result']}.")
        return "\n".join(lines)

    def _classes_with(self, phrase: str) -> list[str]:
        """The classes to test a phrase on: those with a finding of it, else every probed class."""
        with_it = [f.class_ for f in self.tools.findings_list()
                   if lexicon.same_as_any(phrase, (f.phrase, *f.phrases))]
        return list(dict.fromkeys(with_it)) or [self.tools.class_names[y] for y in self.tools.context().pipeline.class_ids]

    def _compare(self, classes: list[str]) -> str:
        classes = classes or self.tools.class_names[:2]
        findings = self.tools.findings_list()
        lines = []
        for name in classes:
            spurious = [f for f in findings if f.class_ == name and f.spurious]
            lines.append(f"{name}: " + ("; ".join(f"{f.phrase} ({f.kind}) {f.effect:+.2f}" for f in spurious[:5])
                                        if spurious else "no confirmed spurious feature"))
        by_phrase: dict[str, dict[str, Finding]] = {}
        for f in findings:
            if f.class_ in classes:
                by_phrase.setdefault(f.phrase, {})[f.class_] = f
        shared = {p: fs for p, fs in by_phrase.items() if len(fs) > 1 and any(f.spurious for f in fs.values())}
        for phrase, fs in list(shared.items())[:5]:
            lines.append(f"{phrase!r} in both: " + ", ".join(
                f"{c} {f.effect:+.2f} ({'spurious' if f.spurious else 'not confirmed'})" for c, f in fs.items()))
        return "\n".join(lines)

    def _next(self) -> str:
        s = self.tools.summary()
        run = s["run_dir"]
        spurious = s["spurious"]
        if not spurious:
            return ("No spurious feature was confirmed, so there is nothing to repair. To look further, test a "
                    "concept you suspect: `test whether the model relies on <something>`.")
        if s["kind"] == "probe":
            return (f"{len(spurious)} spurious features are confirmed. To repair the model, continue this run as an "
                    f"audit: `aspire audit --from-probe {run} --yes` (generates images without them, retrains, "
                    "evaluates and re-probes the repaired model).")
        if s["status"] != "done":
            return (f"The audit waits for your approval to generate images without {len(spurious)} spurious "
                    f"features and retrain: type `approve`, or run `aspire audit --resume {run}`.")
        acc = s["accuracy"]
        before, after = acc.get("before", {}), acc.get("after", {})
        line = ""
        if before.get("worst_group_accuracy") is not None and after.get("worst_group_accuracy") is not None:
            line = (f"The repair moved worst-group accuracy {before['worst_group_accuracy']:.1%} -> "
                    f"{after['worst_group_accuracy']:.1%}. ")
        remaining = [f for f in self.tools.findings_list() if f.after and f.after.verdict in ("unchanged", "new", "reduced")]
        if remaining:
            return line + ("On the repaired model these remain: " + "; ".join(
                f"{f.class_}: {f.phrase} ({f.after.verdict}, effect {f.effect:+.2f} -> {f.after.effect:+.2f})"
                for f in remaining[:5]) + ". Audit the repaired model to repair them too.")
        return line + "Every repaired finding was removed. `aspire report` writes the report."

    def _summary(self) -> str:
        s = self.tools.summary()
        inputs = s["inputs"] or {}
        acc = s["accuracy"]
        started = self.tools.store.events("holdout")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started[0]["time"])) if started and \
            started[0].get("time") else "unknown time"
        lines = [f"{'An' if s['kind'] == 'audit' else 'A'} {s['kind']} run ({s['status']}) of the model {inputs.get('model')} on {inputs.get('data')}, "
                 f"started {when}; classes: {', '.join(s['classes'])}.",
                 f"{s['holdout']} hold-out images, {s['edits']} edits, {s['findings']} findings, "
                 f"{len(s['spurious'])} spurious" + (f": {', '.join(s['spurious'][:6])}." if s["spurious"] else ".")]
        for stage in ("before", "after"):
            if stage in acc and acc[stage].get("worst_group_accuracy") is not None:
                lines.append(f"Accuracy {stage} the repair: worst group {acc[stage]['worst_group_accuracy']:.1%}, "
                             f"average {acc[stage]['average_accuracy']:.1%} ({acc[stage]['split']}).")
        return "\n".join(lines)

    def _stats(self, class_name: str) -> str:
        res = self.tools.phrase_stats(class_name)
        lines = [f"The phrase groups of {res['class']}'s images, by how much more often they come with it than with "
                 "the other classes (lift):"]
        for g in res["groups"]:
            lift = "n/a" if g.get("lift") is None else f"{g['lift']:.1f}"
            lines.append(f"  {g['phrase']} ({g['kind']}): in {g['n']} of its images, lift {lift}"
                         + ("; tested" if g.get("tested") else ""))
        return "\n".join(lines)

    def _approve(self) -> str:
        res = self.tools.approve_and_retrain()
        acc = res.get("accuracy") or {}
        return f"The audit is {res['status']}." + (f" Accuracy: {acc}." if acc else "")

    def _can_draw(self) -> bool:
        return self.console.is_terminal and self.console.color_system is not None and self.console.width >= 80


def describe(f: Finding) -> str:
    """One finding in a sentence with its numbers."""
    what = "Removing it" if f.kind == "foreground" else "Changing it for another background"
    merged = f" (merged: {', '.join(p for p in f.phrases if p != f.phrase)})" if len(f.phrases) > 1 else ""
    verdict = "spurious" if f.spurious else "not confirmed"
    change = f"lowers P({f.class_}) by {f.effect:.3f}" if f.effect >= 0 else f"raises P({f.class_}) by {-f.effect:.3f}"
    text = (f"{f.class_}: {f.phrase}{merged} ({f.kind}), {verdict}. {what} {change} "
            f"(95% CI of the drop [{f.effect_ci[0]:+.3f}, {f.effect_ci[1]:+.3f}]) more than its control "
            f"({f.control_kind or 'none'}) over {f.pairs} paired edits, q = {f.q_value:.2g}; {f.flips} of "
            f"{f.occurrences} edits flip the prediction ({f.flip_rate:.0%}; controls {f.control_flip_rate:.0%}).")
    if f.joint and f.joint_effect is not None:
        text += f" Confirmed jointly: with the class's other candidates removed, {f.joint_effect:+.3f}."
    if f.after is not None:
        text += f" After the repair: {f.after.effect:+.3f} ({f.after.verdict})."
    return text
