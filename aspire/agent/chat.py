"""`aspire chat`: a terminal conversation about one run with an LLM that calls the run's tools.

    ChatSession(tools, settings).run()      streamed answers, tool calls, history in the store
    (without an LLM configured, `aspire chat` runs agent/offline_chat.py's OfflineSession over the same tools)

Ctrl-C while an answer is streaming cancels that answer (the conversation goes on); Ctrl-C or Ctrl-D at the
prompt, or `quit`, ends the session with exit code 0. Every user question, tool call and answer is logged
as a `chat` event of the run store, and the previous conversation is given back to the LLM on the next start.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from rich.console import Console

from aspire import llm
from aspire.agent.tools import RunTools, langchain_tools
from aspire.config import AgentSettings
from aspire.errors import AspireError

QUIT = ("quit", "exit", ":q", "bye")   # what ends a session, at the prompt or on stdin (--json)
MAX_TOOL_STEPS = 6
HISTORY_MESSAGES = 20
CONFIGURE_HELP = (f"No LLM is configured. To talk with one, {llm.CONFIGURE}, or agent.base_url / agent.api_key in a "
                  "--config file; then run `aspire chat` again.")



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
        self.offline = None   # the offline session that answers once the LLM has failed

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

        if self.offline is not None:   # the LLM failed earlier in this session
            return self._offline(text, "", log_question=True)
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
        except Exception as e:  # noqa: BLE001 - the LLM failed: the rest of the session is answered offline
            del self.messages[start:]
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            self.tools.store.log_event("llm_failure", {"stage": "chat", "reason": reason})
            return self._offline(text, reason, log_question=False)   # the question is logged already
        self._log("assistant", content=answer)
        return answer

    def _offline(self, text: str, reason: str, log_question: bool) -> str:
        """Answer offline from the run's evidence (agent/offline_chat.py); the first time, say why."""
        from aspire.agent.offline_chat import OfflineSession

        if self.offline is None:
            self.console.print(f"[yellow]the LLM did not answer[/yellow] ({reason}); answering without it from now "
                               "on, from the run's evidence", highlight=False)
            self.offline = OfflineSession(self.tools, self.console)
        return self.offline.command(text, log_question=log_question)

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
        return chat_loop(self.console, self.turn)


def chat_loop(console: Console, answer: Callable[[str], Any]) -> int:
    """Read a line, answer it, until quit, Ctrl-D or Ctrl-C at the prompt (exit code 0)."""
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ")
        except (KeyboardInterrupt, EOFError):
            console.print("\nbye")
            return 0
        if text.strip().lower() in QUIT:
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
