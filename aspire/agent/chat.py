"""`aspire chat`: a terminal conversation about one run, and the terminal approval prompt of `aspire audit`.

    RunTools(run_dir)                       the tools, over the run store (and the pipeline, for `probe`)
    ChatSession(tools, settings).run()      the conversation: streamed answers, tool calls, history in the store
    offline_session(tools).run()            no LLM configured: says how to configure one, and answers the
                                            offline commands (findings, stats, edits, probe, approve, ...)
    terminal_approver(console)              approve / drop N / add "class:phrase" / reject at each interrupt

Ctrl-C while an answer is streaming cancels that answer (the conversation goes on); Ctrl-C or Ctrl-D at the
prompt, or `quit`, ends the session with exit code 0. Every user question, tool call and answer is logged
as a `chat` event of the run store, and the previous conversation is given back to the LLM on the next start.
Without an LLM the session answers the offline commands and exits 0 as well.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from aspire import llm
from aspire.config import AgentSettings
from aspire.errors import AspireError
from aspire.schemas import Edit, Finding, Probe
from aspire.tools import lexicon

MAX_TOOL_STEPS = 6
HISTORY_MESSAGES = 20
OFFLINE_HELP = """offline commands:
  summary                     what the run holds
  findings [CLASS]            the findings (spurious first), of one class or all
  stats CLASS                 how often each phrase group occurs in CLASS vs the other classes
  edits PHRASE [CLASS]        the edited images of a phrase and whether each flipped the classifier
  probe CLASS PHRASE          edit and test one phrase on one class now
  approve                     approve the paused audit: generate, retrain, evaluate, report
  help, quit"""
CONFIGURE_HELP = (f"No LLM is configured. To talk with one, {llm.CONFIGURE}, or agent.base_url / agent.model in a "
                  "--config file; then run `aspire chat` again.")


# ---------------------------------------------------------------- the tools

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
        audit = self.store.get_meta("audit") or {}
        status = audit.get("status") or ("paused or unfinished" if (self.run_dir / CHECKPOINTS).is_file() else "probe only")
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

    def edits(self, phrase: str, class_name: Optional[str] = None, limit: int = 10) -> dict:
        """The edits of a phrase (and its near-duplicates): image, edited PNG, control or not, flipped or not."""
        phrase = lexicon.normalize(phrase)
        y = self._class_index(class_name) if class_name else None
        probes = {p.edit_id: p for p in self.store.all("probe", Probe)}
        rows = []
        for e in self.store.all("edit", Edit):
            if e.test != "removal" or not lexicon.same_phrase(e.phrase, phrase):
                continue
            pr = probes.get(e.edit_id)
            if y is not None and (pr is None or pr.y != y):
                continue
            rows.append({"edit_id": e.edit_id, "image": e.image, "phrase": e.phrase, "kind": e.kind,
                         "control": e.control, "edited_png": e.edited_png,
                         "flipped": None if pr is None else pr.flipped,
                         "prob_true_before": None if pr is None else round(pr.prob_true_original, 3),
                         "prob_true_after": None if pr is None else round(pr.prob_true_edited, 3)})
        rows.sort(key=lambda r: (r["control"], not r["flipped"], r["image"]))
        real = [r for r in rows if not r["control"]]
        return {"phrase": phrase, "n_edits": len(real), "n_flipped": sum(1 for r in real if r["flipped"]),
                "n_controls": len(rows) - len(real), "edits": rows[:max(1, int(limit))]}

    def probe(self, class_name: str, phrase: str) -> dict:
        """Edit and test one phrase on one class now (with controls); returns its finding."""
        from aspire.agent.nodes import current_stats
        from aspire.agent.planner import finding_for, match_group

        ctx = self.context()
        p = ctx.pipeline
        y = self._class_index(class_name)
        if y not in p.class_ids:
            raise AspireError(f"class {self.class_names[y]!r} was not probed in this run (its hold-out has no images)")
        # 1. the phrase's group among the class's caption phrases
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
                                            "reason": "asked in chat", "source": "chat"})
        result = ("not probed" if f is None else "spurious" if f.spurious else "not spurious")
        self.store.log_event("outcome", {"round": None, "class": self.class_names[y], "class_index": y,
                                         "phrase": name, "kind": kind, "source": "chat", "result": result,
                                         **({} if f is None else {"occurrences": f.occurrences, **evidence(f)})})
        if f is None:
            return {"class": self.class_names[y], "phrase": phrase, "result": "not probed",
                    "why": "no caption of this class's hold-out images names it, or it could not be grounded"}
        return {"class": f.class_, "phrase": f.phrase, "kind": f.kind, "result": result, **evidence(f)}

    def approve_and_retrain(self) -> dict:
        """Approve the paused audit as proposed: generate, retrain, evaluate, report."""
        from aspire.agent import run_audit

        if self.store.get_meta("kind") != "audit":
            raise AspireError(f"{self.run_dir} is a {self.store.get_meta('kind')} run, not an audit: run "
                              "`aspire audit` on the same inputs to repair the classifier")
        if (self.store.get_meta("audit") or {}).get("status") == "done":
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
            except AspireError as e:
                return json.dumps({"error": str(e)})
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


# ---------------------------------------------------------------- the conversation
class ChatSession:
    """One terminal conversation with tool calls over a run; the LLM from `settings` (or `chat_model`)."""

    def __init__(self, tools: RunTools, settings: AgentSettings, *, console: Optional[Console] = None,
                 chat_model: Any = None):
        from langchain_core.messages import SystemMessage

        self.tools = tools
        self.settings = settings
        self.console = console or Console()
        self._lc_tools = {t.name: t for t in langchain_tools(tools)}
        base = chat_model if chat_model is not None else llm.chat_model(settings, "agent")
        self.model = base.bind_tools(list(self._lc_tools.values()))
        self.messages: list = [SystemMessage(content=self.system_prompt())] + self._history()

    def system_prompt(self) -> str:
        from aspire.prompts import render_prompt

        s = self.tools.summary()
        counts = {k: s[k] for k in ("holdout", "edits", "probes")}
        spurious = [{"class": f.class_, "phrase": f.phrase, "kind": f.kind, "flip_rate": round(f.flip_rate, 3),
                     "control_flip_rate": round(f.control_flip_rate, 3), "p_value": float(f"{f.p_value:.3g}"),
                     "effect": round(f.effect, 3), "effect_ci": [round(v, 3) for v in f.effect_ci],
                     "q_value": float(f"{f.q_value:.3g}"),
                     "after": None if f.after is None else {"effect": round(f.after.effect, 3),
                                                            "q_value": float(f"{f.after.q_value:.3g}"),
                                                            "verdict": f.after.verdict}}
                    for f in self.tools.findings_list() if f.spurious or (f.after and f.after.spurious)][:15]
        return render_prompt("chat_system", run_dir=s["run_dir"], kind=s["kind"] or "unknown", status=s["status"],
                             classes=s["classes"], counts=counts, spurious=spurious, n_findings=s["findings"])

    def _history(self) -> list:
        from langchain_core.messages import AIMessage, HumanMessage

        out = []
        for e in self.tools.store.events("chat"):
            if e.get("role") == "user" and not e.get("cancelled"):
                out.append(HumanMessage(content=e.get("content", "")))
            elif e.get("role") == "assistant" and e.get("content"):
                out.append(AIMessage(content=e["content"]))
        return out[-HISTORY_MESSAGES:]

    def _log(self, role: str, **payload: Any) -> None:
        self.tools.store.log_event("chat", {"role": role, **payload})

    # ------------------------------------------------------------ one turn
    def turn(self, text: str) -> str:
        """Answer one question (streamed), calling tools as the LLM asks. Ctrl-C cancels it (re-raised)."""
        from langchain_core.messages import HumanMessage, ToolMessage

        start = len(self.messages)
        self.messages.append(HumanMessage(content=text))
        self._log("user", content=text)
        answer = ""
        try:
            for _ in range(MAX_TOOL_STEPS):
                ai = self._ask()
                self.messages.append(ai)
                answer = llm.text_of(ai.content)
                if not ai.tool_calls:
                    break
                for call in ai.tool_calls:
                    result = self._call_tool(call)
                    self.messages.append(ToolMessage(content=result, tool_call_id=call["id"], name=call["name"]))
            else:
                answer = answer or "(stopped after too many tool calls)"
        except KeyboardInterrupt:
            del self.messages[start:]
            self._log("user", content=text, cancelled=True)
            raise
        except AspireError:
            raise
        except Exception as e:  # noqa: BLE001 - the LLM failed: this question is not answered, the chat goes on
            del self.messages[start:]
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            self.tools.store.log_event("llm_failure", {"stage": "chat", "reason": reason})
            self.console.print(f"[red]the LLM did not answer[/red] ({reason}); ask again, or type `quit`",
                               highlight=False)
            return ""
        self._log("assistant", content=answer)
        return answer

    def _ask(self):
        """One LLM answer, streamed to the console as it comes; retried with backoff before any output."""
        from langchain_core.messages import AIMessage

        last = self.settings.max_retries
        for attempt in llm.attempts(self.settings):
            printed = False
            try:
                if self.settings.stream:
                    full = None
                    try:
                        for chunk in self.model.stream(self.messages):
                            piece = llm.text_of(chunk.content)
                            if piece:
                                if not printed:
                                    self.console.print("[bold green]aspire>[/bold green] ", end="")
                                self.console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
                                self.console.file.flush()
                                printed = True
                            full = chunk if full is None else full + chunk
                    except ValueError as e:       # a server that ignores stream=true sends no chunks
                        if full is not None or "chunks" not in str(e):
                            raise
                    if full is not None:
                        if printed:
                            self.console.print()
                        return AIMessage(content=full.content, tool_calls=full.tool_calls)
                message = self.model.invoke(self.messages)
                if llm.text_of(message.content):
                    self.console.print("[bold green]aspire>[/bold green] ", end="")
                    self.console.print(llm.text_of(message.content), markup=False, highlight=False, soft_wrap=True)
                return message
            except Exception:  # retried while nothing was shown, then raised to turn()
                if printed or attempt == last:
                    raise
        raise RuntimeError("unreachable")

    def _call_tool(self, call: dict) -> str:
        name, args = call["name"], call.get("args") or {}
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        self.console.print(f"[dim]· {name}({shown})[/dim]", highlight=False)
        tool = self._lc_tools.get(name)
        if tool is None:
            result = json.dumps({"error": f"unknown tool {name!r}"})
        else:
            try:
                result = tool.invoke(args)
            except Exception as e:  # noqa: BLE001 - bad arguments from the LLM: told to it, not fatal
                result = json.dumps({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"})
        self._log("tool", name=name, args=args, content=str(result)[:2000])
        return str(result)

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        self.console.print(f"aspire chat on {self.tools.run_dir} — ask about the classifier and its data; "
                           "Ctrl-C cancels an answer, Ctrl-D or `quit` exits.", highlight=False)
        return _loop(self.console, self.turn)


def _loop(console: Console, answer: Callable[[str], Any]) -> int:
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ")
        except (KeyboardInterrupt, EOFError):
            console.print("\nbye")
            return 0
        if text.strip().lower() in ("quit", "exit", ":q", "bye"):
            console.print("bye")
            return 0
        if not text.strip():
            continue
        try:
            answer(text)
        except KeyboardInterrupt:
            console.print("\n[yellow]cancelled[/yellow] (Ctrl-C again or Ctrl-D at the prompt exits)")
        except AspireError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False)


# ---------------------------------------------------------------- without an LLM
class OfflineSession:
    """The offline commands over the same tools, printed as tables."""

    def __init__(self, tools: RunTools, console: Optional[Console] = None):
        self.tools = tools
        self.console = console or Console()

    def run(self) -> int:
        self.console.print(CONFIGURE_HELP, highlight=False)
        self.console.print(OFFLINE_HELP, highlight=False)
        return _loop(self.console, self.command)

    def command(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise AspireError(f"cannot read the command ({e})") from None
        cmd, args = words[0].lower(), words[1:]
        t = self.tools
        self.tools.store.log_event("chat", {"role": "user", "content": line, "offline": True})
        if cmd == "help":
            self.console.print(OFFLINE_HELP, highlight=False)
        elif cmd == "summary":
            self.console.print_json(json.dumps(t.summary(), default=str))
        elif cmd in ("findings", "spurious"):
            res = t.findings(args[0] if args else None, spurious_only=cmd == "spurious", limit=50)
            rows = [{**r, "after": "" if r["after"] is None else f"{r['after']['effect']:+.3f} {r['after']['verdict'] or ''}"}
                    for r in res["findings"]]
            after = ("after",) if any(r["after"] for r in rows) else ()
            self._table(rows, ("class", "phrase", "kind", "edits", "effect", "effect_ci", "q_value",
                               "control_kind", "flip_rate", "control_flip_rate", "spurious", *after))
        elif cmd == "stats" and args:
            res = t.phrase_stats(args[0])
            self._table(res["groups"], ("kind", "phrase", "n", "p_class", "p_other", "lift", "tested"))
        elif cmd == "edits" and args:
            res = t.edits(args[0], args[1] if len(args) > 1 else None, limit=20)
            self.console.print(f"{res['n_edits']} edits of {res['phrase']!r}, {res['n_flipped']} flipped; "
                               f"{res['n_controls']} controls", highlight=False)
            self._table(res["edits"], ("image", "phrase", "control", "flipped", "prob_true_before",
                                       "prob_true_after", "edited_png"))
        elif cmd == "probe" and len(args) >= 2:
            self.console.print_json(json.dumps(t.probe(args[0], " ".join(args[1:])), default=str))
        elif cmd == "approve":
            self.console.print_json(json.dumps(t.approve_and_retrain(), default=str))
        else:
            self.console.print(f"unknown command {line!r}\n{OFFLINE_HELP}", highlight=False)

    def _table(self, rows: list[dict], columns: tuple[str, ...]) -> None:
        table = Table()
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*(str(r.get(c, "")) for c in columns))
        self.console.print(table)


# ---------------------------------------------------------------- approvals in the terminal
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
