"""`aspire chat`: a real conversation turn through a pseudo-terminal against a loopback OpenAI-compatible
server that streams (SSE), the tools over a probed run, Ctrl-C, the offline commands, the approval prompt."""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pexpect
import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk
from rich.console import Console

from aspire.agent.approval import terminal_approver
from aspire.agent.chat import CHAT_CHECKPOINTS, ChatSession
from aspire.agent.tools import RunTools
from aspire.agent.planner import group_key
from aspire.config import AgentSettings
from aspire.schemas import Probe
from aspire.store import RunStore
from llm_server import LoopbackLLM, content, tool_call
from test_agent_graph import make_ctx, world  # noqa: F401 - the world fixture
from test_audit_resume import toy  # noqa: F401 - the toy world fixture

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
    seen: list = []

    def bind_tools(self, tools, **kwargs):
        return self

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        self.calls += 1
        self.seen.append([m.content for m in messages])
        if self.calls == 1:
            yield ChatGenerationChunk(message=AIMessageChunk(content="Partial"))
            raise KeyboardInterrupt
        yield ChatGenerationChunk(message=AIMessageChunk(content="The red cube."))


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder without its chat checkpoints. The databases go through SQLite's backup API: reading
    them as plain files here would drop this process's POSIX locks on them, and the next process to close them
    would delete their WAL files under the connections this process still holds (a "disk I/O error" later)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.sqlite*"))
    for db in src.glob("*.sqlite"):
        if db.name != CHAT_CHECKPOINTS:
            source, target = sqlite3.connect(db), sqlite3.connect(dst / db.name)
            source.backup(target)
            source.close()
            target.close()
    return dst


def test_ctrl_c_cancels_the_answer_and_a_second_exits(probed, tmp_path):
    # a run chatted about before chat.sqlite existed: its logged turns start the thread
    run = copy_run(probed, tmp_path / "run")
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
    tools = RunTools(run)
    tools.store.log_event("chat", {"role": "user", "content": "an earlier question"})
    tools.store.log_event("chat", {"role": "assistant", "content": "an earlier answer"})
    session = ChatSession(tools, AgentSettings(), console=console, chat_model=model)
    # the conversation of earlier sessions (logged with the run) is given back to the LLM
    assert [m.content for m in session.history()[-2:]] == ["an earlier question", "an earlier answer"]
    n_messages = len(session.history())
    assert session.run() == 0
    out = buf.getvalue()
    assert "cancelled" in out and "The red cube." in out and "bye" in out
    later = ChatSession(RunTools(run), AgentSettings(), console=console, chat_model=model)   # the next `aspire chat`
    assert [m.content for m in later.history()[n_messages:]] == ["and now?", "The red cube."]   # nothing of the
    assert "why widget?" not in str(model.seen[-1])                           # cancelled turn, nor sent to the LLM
    later.close()
    users = [e for e in RunStore(run).events("chat") if e["role"] == "user"]
    assert users[-2]["content"] == "why widget?" and users[-2].get("cancelled")


def test_without_an_llm_it_says_how_to_configure_one_and_answers_offline_commands(probed):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["COLUMNS"] = "200"
    proc = subprocess.run([ASPIRE, "chat", "--run-dir", str(probed)], input="findings widget\nedits 'red cube'\nquit\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "No LLM is configured" in proc.stdout and "OPENAI_BASE_URL" in proc.stdout
    assert "widget: red cube (foreground), spurious" in proc.stdout
    assert "Its 16 edits (16 flip the prediction)" in proc.stdout


def test_edits_are_a_findings_group_whatever_member_is_named(probed):
    """`edits PHRASE` shows the edits of the finding the phrase belongs to: all its member phrases, its class and
    kind, so its counts are the finding's own."""
    tools = RunTools(probed)
    for f in tools.findings_list():
        for member in f.phrases:
            res = tools.edits(member, f.class_)
            assert res["phrase"] == f.phrase and res["n_edits"] == f.occurrences and res["n_flipped"] == f.flips
    # a phrase of no finding: its own edits (none here), said as such
    assert tools.edits("purple moon")["finding"] is None and tools.edits("purple moon")["n_edits"] == 0


def test_an_llm_that_fails_hands_the_session_to_the_offline_answers_once(probed):
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    with LoopbackLLM([500] * 10) as llm:
        settings = AgentSettings(base_url=llm.base_url, api_key="x", max_retries=0, timeout_s=5)
        session = ChatSession(RunTools(probed), settings, console=console)
        session.turn("what did you find?")
        session.turn("why does the model call this a widget?")
        asked = len(llm.requests)
    out = buf.getvalue()
    assert out.count("the LLM did not answer") == 1 and "answering without it" in out
    assert asked == 1                                   # the second question did not wait for the LLM again
    assert out.count("widget: red cube (foreground), spurious") == 2


def one_turn(run: Path, script: list, question: str, max_retries: int) -> tuple[str, list, str, ChatSession]:
    """One chat turn on `run` against a loopback LLM answering `script`, not streamed: the answer, the requests
    the LLM got, what the session printed, and the session."""
    buf = io.StringIO()
    with LoopbackLLM(script) as llm:
        settings = AgentSettings(base_url=llm.base_url, api_key="x", max_retries=max_retries, backoff_s=0,
                                 timeout_s=5, stream=False)
        session = ChatSession(RunTools(run), settings, console=Console(file=buf, width=200))
        answer = session.turn(question)
        requests = list(llm.requests)
    return answer, requests, buf.getvalue(), session


def test_a_failed_llm_call_is_retried_from_the_last_checkpoint_without_calling_the_tools_again(probed, tmp_path):
    run = copy_run(probed, tmp_path / "run")
    logged = len(RunStore(run).events("chat"))          # the turns of earlier tests on this run
    script = [tool_call("findings", {"class_name": "widget", "spurious_only": True}), 500,
              content("The red cube flips every widget.")]
    answer, requests, out, session = one_turn(run, script, "what flips widgets?", max_retries=1)
    assert answer == "The red cube flips every widget." and "did not answer" not in out
    assert len(requests) == 3 and requests[2]["messages"] == requests[1]["messages"]   # the same call again
    tools = [e for e in RunStore(run).events("chat")[logged:] if e["role"] == "tool"]
    assert [t["name"] for t in tools] == ["findings"]                                   # called once
    assert [m.type for m in session.history()[-4:]] == ["human", "ai", "tool", "ai"]
    session.close()


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


@pytest.fixture(scope="module")
def toy_probe(toy, tmp_path_factory):  # noqa: F811 - the audit tests' toy world
    """`aspire probe` of the tiny toy-waterbirds model that relies on the place (the audit tests' toy world)."""
    run = tmp_path_factory.mktemp("chat-toy") / "run"
    proc = subprocess.run([ASPIRE, "probe", "--data", str(toy / "data"), "--model", str(toy / "model.pt"),
                           "--run-dir", str(run), "--config", str(toy / "config.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_a_free_conversation_without_an_llm_in_a_terminal(toy_probe):
    """Seven questions in a 120-column pseudo-terminal, answered from the run: each names the finding it is
    about with its numbers; the evidence comes with half-block thumbnails; an unknown concept is said plainly."""
    from aspire.agent.tools import RunTools

    tools = RunTools(toy_probe)
    findings = tools.findings_list()
    spurious = [f for f in findings if f.spurious]
    assert spurious, "the toy model relies on the place: the probe must find it"
    top = spurious[0]
    other_class = next(c for c in tools.class_names if c != top.class_)
    effect = f"{top.effect:.3f}"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(COLUMNS="120", LINES="50", TERM="xterm-256color", COLORTERM="truecolor", HF_HUB_OFFLINE="1")
    child = pexpect.spawn(ASPIRE, ["chat", "--run-dir", str(toy_probe)], env=env, encoding="utf-8", timeout=120,
                          dimensions=(50, 120))
    turns = [
        ("what did you find?", [top.phrase, effect, f"q = {top.q_value:.2g}"]),
        (f"why does the model call this a {top.class_}?", [f"relies on {top.phrase}", effect]),
        ("show me the evidence for the strongest finding", [top.phrase, effect, "edited", "/edits/", "▀"]),
        (f"test whether the model relies on the {top.phrase}", [f"{top.class_}: {top.phrase}", "spurious"]),
        ("test whether the model relies on the purple moon", ["could not test 'purple moon'", "annotations"]),
        (f"compare {top.class_} and {other_class}", [f"{top.class_}:", f"{top.phrase} ({top.kind}) {top.effect:+.2f}"]),
        ("what should I do next?", [f"aspire audit --from-probe {toy_probe}"]),
    ]
    raw = []
    try:
        child.expect("you>")
        for question, wanted in turns:
            child.sendline(question)
            child.expect("you>")
            raw.append(child.before)
            answer = _plain(child.before)
            for fragment in wanted:
                assert fragment in answer, (question, fragment, answer[-1500:])
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    # the evidence turn drew its thumbnails in colour (true-colour escapes around half blocks); no other turn did
    assert "\x1b[38;2;" in raw[2] and raw[2].count("▀") >= 3 * 24
    assert not any("▀" in r for i, r in enumerate(raw) if i != 2)
    logged = [e["content"] for e in RunStore(toy_probe).events("chat") if e["role"] == "assistant"]
    assert len(logged) >= len(turns)


def _plain(text: str) -> str:
    """Terminal output without escape sequences, its lines unwrapped."""
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def test_a_tool_that_fails_is_an_error_the_llm_reads_not_a_failed_llm_call(probed, tmp_path, monkeypatch):
    """An unexpected tool error (here a RuntimeError, as a CUDA out-of-memory would be) goes back to the LLM as the
    tool's answer: the tool runs once, and the session does not fall back to its offline answers."""
    run = copy_run(probed, tmp_path / "run")
    failures = len(RunStore(run).events("llm_failure"))   # of earlier tests on this run
    calls = []

    def failing(self, class_name: Optional[str] = None, spurious_only: bool = False, limit: int = 20) -> dict:
        calls.append(class_name)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(RunTools, "findings", failing)
    script = [tool_call("findings", {"class_name": "widget", "spurious_only": True}), content("The lookup failed.")]
    answer, requests, out, session = one_turn(run, script, "what flips widgets?", max_retries=2)
    session.close()
    assert answer == "The lookup failed." and calls == ["widget"] and len(requests) == 2
    assert "RuntimeError: CUDA out of memory" in json.dumps(requests[1]["messages"])
    assert "did not answer" not in out and len(RunStore(run).events("llm_failure")) == failures


def test_chat_json_answers_one_line_per_question(probed):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    proc = subprocess.run([ASPIRE, "chat", "--run-dir", str(probed), "--json"],
                          input="what did you find?\n\nwhy does the model call this a widget?\nstats nothing\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["question"] for r in replies] == ["what did you find?", "why does the model call this a widget?",
                                                "stats nothing"]
    assert all(r["llm"] is False for r in replies)
    assert "widget: red cube (foreground), spurious" in replies[0]["answer"]
    assert "relies on red cube" in replies[1]["answer"]
    assert replies[2]["answer"] == "'nothing' is not a class of this run; its classes are gizmo, widget."


def test_offline_questions_are_understood_by_what_they_name_and_ask(probed):
    from aspire.agent.offline_chat import OfflineSession

    session = OfflineSession(RunTools(probed), Console(file=io.StringIO()))

    def understood(question):
        intent, args = session.understand(question)
        finding = args.get("finding")
        return intent, {k: (v.phrase if k == "finding" and v is not None else v) for k, v in args.items()
                        if k != "line"} | ({"finding": finding.phrase} if finding else {})

    assert understood("What did you find?") == ("found", {"classes": []})
    assert understood("why does the model call this a widget?") == ("why", {"class_name": "widget"})
    assert understood("show me the evidence for the red cube") == (
        "evidence", {"finding": "red cube", "phrase": "red cube", "classes": []})
    assert understood("show me the evidence for the strongest finding")[1]["finding"] == "red cube"
    assert understood("does the model rely on the green bar in widgets?") == (
        "test", {"phrase": "green bar", "classes": ["widget"]})
    assert understood("test whether it relies on a purple moon") == ("test", {"phrase": "purple moon", "classes": []})
    assert understood("compare gizmos vs widgets") == ("compare", {"classes": ["gizmo", "widget"]})
    assert understood("what should I do next?") == ("next", {})
    assert understood("probe widget blue disk") == ("test", {"phrase": "blue disk", "classes": ["widget"]})
    assert understood("edits 'red cube' widget")[0] == "evidence"
    assert understood("hello there")[0] == "unknown"


def test_intents_are_whole_words(probed):
    """"latest" is no test, "what did the probe find" no probe of "find": cues match whole words."""
    from aspire.agent.offline_chat import OfflineSession

    session = OfflineSession(RunTools(probed), Console(file=io.StringIO()))
    assert session.understand("what did the probe find?")[0] == "found"
    assert session.understand("what is the latest on widgets?")[0] == "why"
