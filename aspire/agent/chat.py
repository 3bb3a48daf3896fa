"""`aspire chat`: a terminal conversation about one run with an LLM that calls the run's tools.

    ChatSession(tools, settings).run()      streamed answers, tool calls, the conversation kept with the run
    (without an LLM configured, `aspire chat` runs agent/offline_chat.py's OfflineSession over the same tools)

The agent is LangGraph's prebuilt ReAct agent (`create_react_agent`) over the run's tools, its conversation
checkpointed in `chat.sqlite` in the run folder (one thread per run: the next `aspire chat` goes on from it; a run
chatted about before that file existed starts from its logged turns). What the prebuilt agent does not do itself:
- a failed LLM call is retried with backoff while nothing of that answer was printed, resuming the graph from its
  last checkpoint (the tools already called are not called again); then the session answers offline;
- Ctrl-C while an answer streams cancels the turn: the checkpoint before it becomes the thread's latest again, so
  the half turn never reaches the LLM, in this session or a later one (Ctrl-C or Ctrl-D at the prompt, or `quit`,
  ends the session, exit 0);
- every question, tool call and answer is also logged as a `chat` event of the run store (the offline mode and the
  report read them).
"""

from __future__ import annotations

import sqlite3
import warnings
from typing import Any, Optional

from rich.console import Console

from aspire import llm
from aspire.agent.offline_chat import OfflineSession
from aspire.agent.terminal import chat_loop
from aspire.agent.tools import RunTools, langchain_tools
from aspire.config import AgentSettings
from aspire.errors import AspireError

MAX_TOOL_STEPS = 6
HISTORY_MESSAGES = 20                  # of the conversation, what the LLM is given back
CHAT_CHECKPOINTS = "chat.sqlite"
THREAD = {"configurable": {"thread_id": "chat"}}


# ---------------------------------------------------------------- the conversation
class ChatSession:
    """One terminal conversation with tool calls over a run; the LLM from `settings` (or `chat_model`)."""

    def __init__(self, tools: RunTools, settings: AgentSettings, *, console: Optional[Console] = None,
                 chat_model: Any = None):
        from langgraph.checkpoint.sqlite import SqliteSaver
        from langgraph.prebuilt import create_react_agent

        self.tools = tools
        self.settings = settings
        self.console = console or Console()
        model = chat_model if chat_model is not None else llm.chat_model(settings, "agent")
        if not settings.stream:
            model = model.model_copy(update={"disable_streaming": True})
        self._conn = sqlite3.connect(tools.run_dir / CHAT_CHECKPOINTS, check_same_thread=False)
        with warnings.catch_warnings():   # its successor, langchain.agents.create_agent, is not in the pinned set
            warnings.filterwarnings("ignore", message="create_react_agent has been moved")
            self.agent = create_react_agent(model, langchain_tools(tools), prompt=self._prompt,
                                            checkpointer=SqliteSaver(self._conn))
        if not self.agent.get_state(THREAD).values:   # a new thread: the turns logged before, or nothing
            self.agent.update_state(THREAD, {"messages": self._logged_history()})
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

    def _prompt(self, state: dict) -> list:
        """What the LLM is given: the system prompt (the run as it is now) and the recent conversation, cut where
        a question begins (never between a tool call and its result)."""
        from langchain_core.messages import HumanMessage, SystemMessage

        messages = list(state["messages"])
        recent = messages[-HISTORY_MESSAGES:]
        while len(recent) < len(messages) and recent and not isinstance(recent[0], HumanMessage):
            recent = recent[1:]
        return [SystemMessage(content=self.system_prompt())] + recent

    def _logged_history(self) -> list:
        from langchain_core.messages import AIMessage, HumanMessage

        out = []
        for e in self.tools.store.events("chat"):
            if e.get("role") == "user" and not e.get("cancelled"):
                out.append(HumanMessage(content=e.get("content", "")))
            elif e.get("role") == "assistant" and e.get("content"):
                out.append(AIMessage(content=e["content"]))
        return out[-HISTORY_MESSAGES:]

    def history(self) -> list:
        """The conversation the agent holds (its checkpointed messages)."""
        return list(self.agent.get_state(THREAD).values.get("messages", []))

    def _log(self, role: str, **payload: Any) -> None:
        self.tools.store.log_event("chat", {"role": role, **payload})

    # ------------------------------------------------------------ one turn
    def turn(self, text: str) -> str:
        """Answer one question (streamed), calling tools as the LLM asks. Ctrl-C cancels it (re-raised)."""
        from langchain_core.messages import HumanMessage

        if self.offline is not None:   # the LLM failed earlier in this session
            return self._offline(text, "", log_question=True)
        before = self.agent.get_state(THREAD).config     # the checkpoint to go back to if the turn is dropped
        self._log("user", content=text)
        todo: Any = {"messages": [HumanMessage(content=text)]}
        try:
            for attempt in llm.attempts(self.settings):
                printed = [False]
                try:
                    self._stream(todo, printed)
                    break
                except Exception:   # retried while nothing of the failed answer was shown
                    if printed[0] or attempt == self.settings.max_retries:
                        raise
                    todo = None   # resume from the last checkpoint (the tools called stay called)
        except KeyboardInterrupt:
            self._drop_turn(before)
            self._log("user", content=text, cancelled=True)
            raise
        except AspireError:
            self._drop_turn(before)
            raise
        except Exception as e:  # noqa: BLE001 - the LLM failed: the rest of the session is answered offline
            self._drop_turn(before)
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            self.tools.store.log_event("llm_failure", {"stage": "chat", "reason": reason})
            return self._offline(text, reason, log_question=False)   # the question is logged already
        last = self.history()[-1]
        answer = llm.text_of(last.content) if last.type == "ai" else ""
        self._log("assistant", content=answer)
        return answer

    def _drop_turn(self, before: dict) -> None:
        """Make the checkpoint before a dropped turn the thread's latest (kept in chat.sqlite: a later session goes
        on from it too)."""
        self.agent.update_state(before, None)

    def _stream(self, todo: Any, printed: list[bool]) -> None:
        """Run the agent on `todo`, printing the answer's tokens as they come and each tool call; `printed[0]`
        turns true once anything of the current LLM answer was shown."""
        calls: dict[str, dict] = {}
        started = False
        limit = {"recursion_limit": 2 * MAX_TOOL_STEPS + 1}
        for mode, chunk in self.agent.stream(todo, {**THREAD, **limit}, stream_mode=["messages", "updates"],
                                              durability="sync"):
            if mode == "messages":
                message, meta = chunk
                piece = llm.text_of(message.content) if meta.get("langgraph_node") == "agent" else ""
                if piece:
                    if not started:
                        self.console.print("[bold green]aspire>[/bold green] ", end="")
                        started = True
                    self.console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
                    self.console.file.flush()
                    printed[0] = True
                continue
            for node, update in chunk.items():
                for message in (update or {}).get("messages", []):
                    if node == "agent":
                        if started:
                            self.console.print()
                            started = False
                        printed[0] = False   # the next LLM answer may be retried again
                        for call in message.tool_calls:
                            calls[call["id"]] = call
                            shown = ", ".join(f"{k}={v!r}" for k, v in (call.get("args") or {}).items())
                            self.console.print(f"[dim]· {call['name']}({shown})[/dim]", highlight=False)
                    elif node == "tools":
                        call = calls.get(message.tool_call_id, {})
                        self._log("tool", name=message.name, args=call.get("args") or {},
                                  content=str(message.content)[:2000])
        if started:
            self.console.print()

    def _offline(self, text: str, reason: str, log_question: bool) -> str:
        """Answer offline from the run's evidence (agent/offline_chat.py); the first time, say why."""
        if self.offline is None:
            self.console.print(f"[yellow]the LLM did not answer[/yellow] ({reason}); answering without it from now "
                               "on, from the run's evidence", highlight=False)
            self.offline = OfflineSession(self.tools, self.console)
        return self.offline.command(text, log_question=log_question)

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        self.console.print(f"aspire chat on {self.tools.run_dir} — ask about the classifier and its data; "
                           "Ctrl-C cancels an answer, Ctrl-D or `quit` exits.", highlight=False)
        try:
            return chat_loop(self.console, self.turn)
        finally:
            self.close()

    def close(self) -> None:
        self._conn.close()
