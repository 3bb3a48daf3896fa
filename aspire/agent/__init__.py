"""The investigation agent: a LangGraph audit over the probe pipeline, planned by an LLM or offline.

    graph.py    the wiring diagram          nodes.py    the nodes (verbs) and routers
    state.py    the state and its reducers  planner.py  the offline planner; llm_planner.py the LLM planner
    runner.py   running or resuming an audit (make_planner, audit_context, context_from_run, run_audit)
    tools.py    what `aspire chat` can look up and do in a run (RunTools; the same as LangChain tools)
    chat.py     `aspire chat` with an LLM (LangGraph's ReAct agent; the conversation in the run's chat.sqlite)
    offline_chat.py  without one (free questions, answered from the evidence); terminal.py  the loop of both
    approval.py the audit's approval: what each interrupt shows, how an answer is read and recorded, the
                terminal prompt
"""

from aspire.agent.runner import (CHECKPOINTS, AuditResult, audit_context, auto_approve, context_from_run, make_planner,
                                 run_audit, sorted_findings, thread_id)
from aspire.agent.state import AuditContext, AuditState

__all__ = ["CHECKPOINTS", "AuditContext", "AuditResult", "AuditState", "audit_context", "auto_approve",
           "context_from_run", "make_planner", "run_audit", "sorted_findings", "thread_id"]
