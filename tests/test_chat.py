"""`aspire chat`: a real conversation turn through a pseudo-terminal against a loopback OpenAI-compatible
server that streams (SSE), the tools over a probed run, Ctrl-C, the offline commands, the approval prompt."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk
from rich.console import Console

from aspire.agent.approval import terminal_approver
from aspire.agent.chat import ChatSession
from aspire.agent.tools import RunTools
from aspire.agent.planner import group_key
from aspire.config import AgentSettings
from aspire.schemas import Probe
from llm_server import LoopbackLLM, content, tool_call
from test_agent_graph import make_ctx, world  # noqa: F401 - the world fixture

ASPIRE = str(Path(sys.executable).with_name("aspire"))


class StreamingLLM(LoopbackLLM):
    """LoopbackLLM that answers `stream: true` requests as server-sent events, as OpenAI does."""

    def _send(self, handler, status, payload):
        body = self.requests[-1] if self.requests else {}
        if status != 200 or not body.get("stream"):
            return LoopbackLLM._send(handler, status, payload)
        message = payload["choices"][0]["message"]
        base = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
                "model": payload["model"]}
        deltas = [{"role": "assistant", "content": ""}]
        for i, word in enumerate((message.get("content") or "").split(" ")):
            deltas.append({"content": word if i == 0 else " " + word})
        for i, call in enumerate(message.get("tool_calls") or []):
            deltas.append({"tool_calls": [{"index": i, **call}]})
        events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": payload["choices"][0]["finish_reason"]}]})
        data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.end_headers()
            handler.wfile.write(data.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def probed(world, tmp_path_factory):  # noqa: F811
    """A run of the world with its findings (red cube spurious for widget), paused before generation."""
    from aspire.agent import run_audit

    run_dir = tmp_path_factory.mktemp("chat") / "run"
    ctx = make_ctx(world, run_dir)
    result = run_audit(ctx)
    assert result.status == "paused"
    return run_dir


def test_one_real_turn_in_a_terminal(probed):
    script = [tool_call("findings", {"class_name": "widget", "spurious_only": True}),
              content("Removing the red cube flips every widget image: a shortcut.")]
    with StreamingLLM(script) as llm:
        env = {**os.environ, "OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "x", "COLUMNS": "200",
               "ASPIRE_AGENT__MAX_RETRIES": "0"}
        child = pexpect.spawn(ASPIRE, ["chat", "--run-dir", str(probed)], env=env, encoding="utf-8", timeout=90)
        try:
            child.expect("you>")
            child.sendline("which features flip widgets?")
            child.expect(r"findings\(class_name='widget', spurious_only=True\)")
            child.expect("Removing the red cube flips every widget image: a shortcut.")
            child.expect("you>")
            child.sendeof()
            child.expect(pexpect.EOF)
        finally:
            child.close()
        requests = list(llm.requests)
    assert child.exitstatus == 0
    assert all(r.get("stream") for r in requests) and len(requests) == 2
    tool_messages = [m for m in requests[1]["messages"] if m["role"] == "tool"]
    found = json.loads(tool_messages[0]["content"])
    assert found["findings"][0]["phrase"] == "red cube" and found["findings"][0]["flip_rate"] == 1.0
    assert "red cube" in requests[0]["messages"][0]["content"]           # the system prompt knows the run
    from aspire.store import RunStore

    chat = RunStore(probed).events("chat")
    assert [c["role"] for c in chat[-3:]] == ["user", "tool", "assistant"]
    assert chat[-1]["content"].startswith("Removing the red cube")


def test_tools_answer_from_the_store_and_probe_on_demand(world, tmp_path):  # noqa: F811
    from aspire.agent import run_audit

    ctx = make_ctx(world, tmp_path / "run")
    run_audit(ctx)
    tools = RunTools(tmp_path / "run", context=ctx)
    spurious = tools.findings("widget", spurious_only=True)
    assert [f["phrase"] for f in spurious["findings"]] == ["red cube"]
    edits = tools.edits("red cube")
    assert (edits["n_edits"], edits["n_flipped"], edits["n_controls"]) == (16, 16, 16)
    stats = tools.phrase_stats("widgets")
    assert stats["groups"][0]["phrase"] == "red cube" and stats["groups"][0]["tested"]
    # probing an untested phrase now: recorded with its reason and outcome
    probes_before = ctx.pipeline.store.count("probe")
    probes_before_removal = sum(p.test == "removal" for p in ctx.pipeline.store.all("probe", Probe))
    result = tools.probe("1", "blue disk")
    assert result["result"] == "not spurious" and result["edits"] == 16
    probes = ctx.pipeline.store.all("probe", Probe)
    assert sum(p.test == "removal" for p in probes) == probes_before_removal + 32   # 16 edits, 16 controls
    assert len(probes) > probes_before   # and the insertion and joint tests of the groups testable now
    assert ctx.pipeline.store.events("outcome")[-1]["source"] == "chat"
    with pytest.raises(Exception, match="unknown class"):
        tools.findings("spaceship")


class Interrupted(FakeMessagesListChatModel):
    """Streams one chunk, then the user presses Ctrl-C; the next answer is plain."""

    calls: int = 0

    def bind_tools(self, tools, **kwargs):
        return self

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls += 1
        if self.calls == 1:
            yield ChatGenerationChunk(message=AIMessageChunk(content="Partial"))
            raise KeyboardInterrupt
        yield ChatGenerationChunk(message=AIMessageChunk(content="The red cube."))


def test_ctrl_c_cancels_the_answer_and_a_second_exits(probed):
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    inputs = iter(["why widget?", "and now?"])

    def fake_input(prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise KeyboardInterrupt from None   # Ctrl-C at the prompt

    console.input = fake_input
    model = Interrupted(responses=[AIMessage(content="unused")])
    tools = RunTools(probed)
    tools.store.log_event("chat", {"role": "user", "content": "an earlier question"})
    tools.store.log_event("chat", {"role": "assistant", "content": "an earlier answer"})
    session = ChatSession(tools, AgentSettings(), console=console, chat_model=model)
    # the conversation of earlier sessions (kept with the run) is given back to the LLM
    assert [m.content for m in session.messages[-2:]] == ["an earlier question", "an earlier answer"]
    n_messages = len(session.messages)
    assert session.run() == 0
    out = buf.getvalue()
    assert "cancelled" in out and "The red cube." in out and "bye" in out
    assert len(session.messages) == n_messages + 2          # the cancelled turn left nothing behind
    from aspire.store import RunStore

    users = [e for e in RunStore(probed).events("chat") if e["role"] == "user"]
    assert users[-2]["content"] == "why widget?" and users[-2].get("cancelled")


def test_without_an_llm_it_says_how_to_configure_one_and_answers_offline_commands(probed):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["COLUMNS"] = "200"
    proc = subprocess.run([ASPIRE, "chat", "--run-dir", str(probed)], input="findings widget\nedits 'red cube'\nquit\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "No LLM is configured" in proc.stdout and "OPENAI_BASE_URL" in proc.stdout
    assert "red cube" in proc.stdout and "16 edits of 'red cube', 16 flipped; 16 controls" in proc.stdout


def test_terminal_approval_prompt_drops_and_adds():
    payload = {"stage": "generate", "proposed": ["1|foreground|red cube"], "max_edits_per_class": 35,
               "findings": [{"n": 1, "key": "1|foreground|red cube", "class": "widget", "phrase": "red cube",
                             "kind": "foreground", "occurrences": 16, "flips": 16, "flip_rate": 1.0,
                             "control_flip_rate": 0.0, "p_value": 1e-9, "spurious": True, "effect": 0.9,
                             "effect_ci": [0.9, 0.9], "q_value": 1e-8, "edits": 16},
                            {"n": 2, "key": "1|foreground|yellow star", "class": "widget", "phrase": "yellow star",
                             "kind": "foreground", "occurrences": 12, "flips": 0, "flip_rate": 0.0,
                             "control_flip_rate": 0.0, "p_value": 1.0, "spurious": False, "effect": 0.0,
                             "effect_ci": [0.0, 0.0], "q_value": 1.0, "edits": 0}],
               "cost": {"images_per_class": 50, "images_to_generate": 50,
                        "retrain": {"method": "erm", "epochs": 3, "train_images": 32}}}
    answers = iter(["drop 1", 'add "widget:yellow star"', "maybe", "approve"])
    buf = io.StringIO()
    prompts = []
    decide = terminal_approver(Console(file=buf, width=200), ask=lambda prompt: prompts.append(prompt) or next(answers))
    assert decide(payload) == {"decision": "edit", "drop": ["1|foreground|red cube"],
                               "add": ["1|foreground|yellow star"]}
    shown = buf.getvalue()
    assert "16 edits to generate from" in shown and "images to generate: 50" in shown and "3 epochs" in shown
    assert "+0.900 [+0.900, +0.900]" in shown
    assert "0 edits to generate from" in shown and "images to generate: 0" in shown       # after "drop 1"
    assert prompts[0].endswith("[approve]: ")
    reject = terminal_approver(Console(file=io.StringIO()), ask=lambda prompt: "reject")
    assert reject({"stage": "retrain", "augmented": {"n_images": 8}, "cost": {}}) == {"decision": "reject"}
    assert group_key(1, "foreground", "red cube") == payload["proposed"][0]
