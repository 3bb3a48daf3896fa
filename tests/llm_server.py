"""A loopback OpenAI-compatible chat-completions server for tests: the real HTTP client code runs.

    with LoopbackLLM([tool_answer({"items": [...]}), 500, Delay(2.0), lambda body: content("hi")]) as llm:
        chat = ChatOpenAI(base_url=llm.base_url, api_key="x", model="m", max_retries=0)
        ...
        llm.requests  # the JSON bodies received, in order (.paths, .headers alongside)

Each POST /v1/chat/completions takes the next scripted response:
- a dict: the assistant message (`{"content": "..."}` or `{"tool_calls": [...]}`), wrapped in a completion;
- an int: that HTTP status with an OpenAI-style error body;
- `Delay(seconds, then)`: wait (for client timeouts), then answer `then` (default: an empty message);
- a callable(request_body) -> any of the above.
When the script is exhausted the server answers 500 and counts it in `.unscripted`. The server binds
127.0.0.1 on a free port and stops (waking any sleeping handler) when the `with` block exits.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Sequence, Union


@dataclass
class Delay:
    seconds: float
    then: Any = None


Response = Union[dict, int, Delay, Callable[[dict], Any]]


def content(text: str) -> dict:
    """A plain assistant message."""
    return {"role": "assistant", "content": text}


def tool_call(name: str, arguments: Union[dict, str], call_id: str = "call_1") -> dict:
    """An assistant message calling tool `name`; `arguments` as a dict, or a raw (possibly malformed) string."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]}


def requested_tool(body: dict) -> Optional[str]:
    """The tool name a request forces (tool_choice) or offers first; None when it offers no tools."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return choice.get("function", {}).get("name")
    tools = body.get("tools") or []
    return tools[0]["function"]["name"] if tools else None


def structured(arguments: Union[dict, str]) -> Callable[[dict], dict]:
    """Answer a structured-output request whichever way it asks: a call of the requested tool
    (function calling), else the JSON as message content (response_format json_schema / plain)."""

    def answer(body: dict) -> dict:
        name = requested_tool(body)
        if name:
            return tool_call(name, arguments)
        return content(arguments if isinstance(arguments, str) else json.dumps(arguments))

    return answer


class LoopbackLLM:
    """Scripted OpenAI-compatible server on 127.0.0.1; a context manager."""

    def __init__(self, responses: Sequence[Response] = ()):
        self._script = list(responses)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.unscripted = 0
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LoopbackLLM":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # the name is http.server's API
                owner._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()  # wakes handlers sleeping in a Delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackLLM is not running: use it in a `with` block")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def add(self, *responses: Response) -> None:
        """Append responses to the script."""
        with self._lock:
            self._script.extend(responses)

    # ------------------------------------------------------------ serving
    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        with self._lock:
            self.requests.append(body)
            self.paths.append(handler.path)
            self.headers.append({k.lower(): v for k, v in handler.headers.items()})
            if handler.path.rstrip("/") != "/v1/chat/completions":
                response: Response = 404
            elif self._script:
                response = self._script.pop(0)
            else:
                self.unscripted += 1
                response = 500
        if callable(response) and not isinstance(response, (Delay, int, dict)):
            response = response(body)
        if isinstance(response, Delay):
            if self._stop.wait(response.seconds):
                return  # shutting down: drop the connection
            response = response.then if response.then is not None else content("")
            if callable(response):
                response = response(body)
        if isinstance(response, int):
            self._send(handler, response, {"error": {"message": f"scripted HTTP {response}",
                                                     "type": "server_error", "code": response}})
            return
        message = {"role": "assistant", "content": None, **response}
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        self._send(handler, 200, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "loopback"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)
