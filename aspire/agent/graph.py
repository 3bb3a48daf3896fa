"""The audit graph, as a wiring diagram. Nodes are the verbs in nodes.py; routers are `route_*` there.

    START → select_holdout → caption → extract_phrases → hypothesize ⇄ probe      (until stable or a budget)
          → review (interrupt: approve / edit / reject) → generate → commit (interrupt) → retrain
          → evaluate → reprobe (the stored edits on the retrained model) → report → END
    review rejected or nothing to repair → evaluate;  nothing generated or commit rejected → evaluate;
    not retrained → report
"""

from __future__ import annotations

from typing import Any, Optional

from langgraph.graph import END, START, StateGraph

from aspire.agent import nodes
from aspire.agent.state import AuditContext, AuditState


def build_graph(checkpointer: Optional[Any] = None):
    g = StateGraph(AuditState, context_schema=AuditContext)

    g.add_node("select_holdout", nodes.select_holdout)
    g.add_node("caption", nodes.caption)
    g.add_node("extract_phrases", nodes.extract_phrases)
    g.add_node("hypothesize", nodes.hypothesize)
    g.add_node("probe", nodes.probe)
    g.add_node("review", nodes.review)
    g.add_node("generate", nodes.generate)
    g.add_node("commit", nodes.commit)
    g.add_node("retrain", nodes.retrain)
    g.add_node("evaluate", nodes.evaluate)
    g.add_node("reprobe", nodes.reprobe)
    g.add_node("report", nodes.report)

    g.add_edge(START, "select_holdout")
    g.add_edge("select_holdout", "caption")
    g.add_edge("caption", "extract_phrases")
    g.add_edge("extract_phrases", "hypothesize")
    g.add_conditional_edges("hypothesize", nodes.route_after_hypothesize)
    g.add_conditional_edges("probe", nodes.route_after_probe)
    g.add_conditional_edges("review", nodes.route_after_review)
    g.add_conditional_edges("generate", nodes.route_after_generate)
    g.add_conditional_edges("commit", nodes.route_after_commit)
    g.add_edge("retrain", "evaluate")
    g.add_conditional_edges("evaluate", nodes.route_after_evaluate)
    g.add_edge("reprobe", "report")
    g.add_edge("report", END)

    return g.compile(checkpointer=checkpointer)
