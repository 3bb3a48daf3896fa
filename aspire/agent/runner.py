"""Running an audit: the planner, the audit context (new or from a run folder), the checkpointed graph run.

    make_planner(settings) -> (planner, note)          LLMPlanner when an LLM is configured, else OfflinePlanner
    audit_context(dataset, classifier, config, store, model_path=..., classes=..., seed=...) -> AuditContext
    context_from_run(run_dir, ...) -> AuditContext      rebuilt from the run store's meta (resume, chat)
    run_audit(context, approve=None) -> AuditResult     runs or resumes the graph; `approve(payload)` answers
                                                        each interrupt (None: stop there, status "paused")

Checkpoints live in `<run_dir>/checkpoints.sqlite` (langgraph-checkpoint-sqlite), written synchronously
after every step; the thread id is meta "audit" of the run store. `run_audit` on a killed run continues
from the last checkpoint; on a finished run it returns the recorded result.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from aspire.agent.state import AuditContext, AuditState
from aspire.config import AgentSettings, AspireConfig
from aspire.schemas import Finding
from aspire.store_schema import AuditMeta
from aspire.tools.probe import rank_key

CHECKPOINTS = "checkpoints.sqlite"
Approver = Callable[[dict], Any]


def make_planner(settings: AgentSettings):
    """(the planner, a line saying which one and why)."""
    from aspire import llm
    from aspire.agent.llm_planner import LLMPlanner
    from aspire.agent.planner import OfflinePlanner

    if settings.offline:
        return OfflinePlanner(), "planning offline (deterministic planner: --offline)"
    if not llm.configured(settings):
        return OfflinePlanner(), ("no LLM configured (OPENAI_API_KEY / OPENAI_BASE_URL / agent.base_url): "
                                  "planning with the offline deterministic planner")
    return LLMPlanner(settings), f"planning with LLM {settings.model} at {llm.endpoint(settings)[0] or 'api.openai.com'}"


def audit_context(dataset, classifier, config: AspireConfig, store, *, model_path: str,
                  classes: Optional[Sequence[str]] = None, seed: int = 0, progress: bool = False,
                  planner=None) -> AuditContext:
    from aspire.workflows.probe import ProbePipeline
    from aspire.progress import step_progress

    pipeline = ProbePipeline(dataset, classifier, config, store, classes=classes, seed=seed,
                             progress=step_progress if progress else None)
    planner = planner or make_planner(config.agent)[0]
    return AuditContext(pipeline=pipeline, dataset=dataset, config=config, planner=planner,
                        model_path=str(model_path), seed=seed, progress=progress)


def context_from_run(run_dir: str | Path, *, agent_overrides: Optional[dict] = None, device: Optional[str] = None,
                     progress: bool = False, secrets_from: Optional[str | Path] = None) -> AuditContext:
    """The audit context of an existing run folder: dataset, classifier, settings and planner from its meta.
    `agent_overrides` (flags given on resume) are recorded; API keys come from the environment or `secrets_from`."""
    from aspire.workflows.runs import existing_run, load_inputs, record_overrides, recorded_args, recorded_config

    store = existing_run(run_dir)
    args = recorded_args(store)
    config = recorded_config(store, secrets_from)
    if agent_overrides:
        config.agent = config.agent.model_copy(update=agent_overrides)
        record_overrides(store, config)
    dataset, classifier = load_inputs(args, device)
    return audit_context(dataset, classifier, config, store, model_path=args.model, classes=args.classes,
                         seed=args.seed, progress=progress)


def thread_id(store) -> str:
    """The run's LangGraph thread id (meta "audit"), created on first use."""
    meta = store.meta("audit", AuditMeta())
    if not meta.thread_id:
        meta.thread_id = f"audit-{uuid.uuid4().hex[:12]}"
        store.set_meta("audit", meta)
    return meta.thread_id


@contextlib.contextmanager
def checkpointer(run_dir: str | Path) -> Iterator[Any]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(Path(run_dir) / CHECKPOINTS, check_same_thread=False)
    try:
        yield SqliteSaver(conn)
    finally:
        conn.close()


@dataclass
class AuditResult:
    run_dir: Path
    status: str                                  # done | paused
    findings: list[Finding]
    state: dict = field(default_factory=dict)
    pending: Optional[dict] = None               # the interrupt's payload when paused

    def to_json(self) -> dict:
        s = self.state
        return {"run_dir": str(self.run_dir), "status": self.status,
                "findings": [f.to_json() for f in self.findings],
                "counts": s.get("counts", {}), "rounds": s.get("round", 0), "stop_reason": s.get("stop_reason"),
                "llm_calls": s.get("llm_calls", 0), "llm_failures": s.get("llm_failures", 0),
                "features": s.get("features", []), "approvals": s.get("approvals", {}),
                "augmented": s.get("augmented"), "models": s.get("models"), "accuracy": s.get("accuracy"),
                "reprobe": s.get("reprobe"), "report": s.get("report"), "pending": self.pending}


def sorted_findings(store) -> list[Finding]:
    found = store.all("finding", Finding)
    found.sort(key=rank_key)
    return found


def run_audit(ctx: AuditContext, approve: Optional[Approver] = None) -> AuditResult:
    """Run (or resume) the audit graph of ctx's run store until it ends, or pauses at an unanswered interrupt."""
    from langgraph.types import Command

    from aspire.agent.graph import build_graph

    store = ctx.pipeline.store
    config = {"configurable": {"thread_id": thread_id(store)},
              "recursion_limit": 4 * ctx.config.agent.max_rounds + 40}
    with checkpointer(store.run_dir) as saver:
        graph = build_graph(saver)
        snapshot = graph.get_state(config)
        if store.meta("audit", AuditMeta()).status == "done":
            return AuditResult(store.run_dir, "done", sorted_findings(store), dict(snapshot.values))
        # Not started, or killed right after its input checkpoint (which LangGraph does not resume): start.
        # Otherwise continue from the last checkpoint (a graph that ended before its status was recorded
        # returns at once).
        fresh = snapshot.created_at is None or (snapshot.metadata or {}).get("source") == "input"
        todo: Any = AuditState(round=0, spurious=[], unchanged_rounds=0) if fresh else None
        while True:
            result = graph.invoke(todo, config, context=ctx, durability="sync")
            pending = result.get("__interrupt__") if isinstance(result, dict) else None
            if not pending:
                break
            payload = pending[0].value
            if approve is None:
                state = dict(graph.get_state(config).values)
                return AuditResult(store.run_dir, "paused", sorted_findings(store), state, payload)
            todo = Command(resume=approve(payload))
        state = dict(graph.get_state(config).values)
    store.set_meta("audit", store.meta("audit", AuditMeta()).model_copy(update={"status": "done"}))
    return AuditResult(store.run_dir, "done", sorted_findings(store), state)


def auto_approve(payload: dict) -> dict:
    """--yes: approve every stage as proposed (recorded as automatic)."""
    return {"decision": "approve", "auto": True}
