"""The investigation agent: a LangGraph audit over the probe pipeline, planned by an LLM or offline.

    graph.py    the wiring diagram          nodes.py    the nodes (verbs) and routers
    state.py    the state and its reducers  planner.py  the offline planner; llm.py the LLM planner
    runner.py   running or resuming an audit (make_planner, audit_context, context_from_run, run_audit)
    chat.py     `aspire chat`: the assistant's tools, the LLM and offline sessions, the approval prompt
"""

from aspire.agent.runner import (CHECKPOINTS, AuditResult, audit_context, auto_approve, context_from_run, make_planner,
                                 run_audit, sorted_findings, thread_id)
from aspire.agent.state import AuditContext, AuditState

__all__ = ["CHECKPOINTS", "AuditContext", "AuditResult", "AuditState", "audit_context", "auto_approve",
           "context_from_run", "make_planner", "run_audit", "sorted_findings", "thread_id"]
