"""Locust soak test: chat completions, streamed and not, against a running gateway.

locust is an optional extra (``pip install -e '.[load]'``). Point it at a gateway with ``--host``:

    llm-gateway serve --config load/bench.yaml --port 8200 >/dev/null &   # plus its mock, see README
    locust -f load/locustfile.py --host http://127.0.0.1:8200 --headless -u 50 -r 10 -t 10m

Options (command line, or the environment variable in brackets):
  --llm-model NAME       model to ask for (LLMGW_MODEL, default "bench")
  --llm-api-key KEY      sent as ``Authorization: Bearer KEY`` (LLMGW_API_KEY, default none)
  --llm-stream-share F   share of requests that stream, 0..1 (LLMGW_STREAM_SHARE, default 0.5)
  --llm-max-tokens N     max_tokens in each request (LLMGW_MAX_TOKENS, default 64)
  --llm-wait S           think time per user between requests, up to S seconds (LLMGW_WAIT, default 0.5)

Statistics: ``chat`` is a whole non-stream request; ``chat (stream) first byte`` is the time to the
response head (the gateway starts a stream only once the first data event arrived, so this is close
to time-to-first-token); ``chat (stream) complete`` is the whole stream, which fails unless it ends
with ``data: [DONE]`` and carries no error event.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from locust import FastHttpUser, events, task

PATH = "/v1/chat/completions"
PROMPTS = (
    "Say hello.",
    "Summarise the plot of a short story about a lighthouse keeper in two sentences.",
    "List three prime numbers.",
    "Write a haiku about load tests.",
)


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("llm-gateway")
    group.add_argument("--llm-model", env_var="LLMGW_MODEL", default="bench", help="model to request")
    group.add_argument("--llm-api-key", env_var="LLMGW_API_KEY", default="", help="bearer key (optional)")
    group.add_argument(
        "--llm-stream-share", env_var="LLMGW_STREAM_SHARE", type=float, default=0.5, help="share streamed"
    )
    group.add_argument("--llm-max-tokens", env_var="LLMGW_MAX_TOKENS", type=int, default=64)
    group.add_argument("--llm-wait", env_var="LLMGW_WAIT", type=float, default=0.5, help="max think time")


class ChatUser(FastHttpUser):
    def wait_time(self) -> float:
        return random.uniform(0.0, max(0.0, float(self.environment.parsed_options.llm_wait)))

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.model = opts.llm_model
        self.stream_share = min(1.0, max(0.0, opts.llm_stream_share))
        self.max_tokens = opts.llm_max_tokens
        self.headers = {"Content-Type": "application/json"}
        if opts.llm_api_key:
            self.headers["Authorization"] = f"Bearer {opts.llm_api_key}"

    def _body(self, stream: bool) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
            "max_tokens": self.max_tokens,
        }
        if stream:
            body["stream"] = True
        return json.dumps(body)

    @task
    def chat(self) -> None:
        if random.random() < self.stream_share:
            self._stream()
        else:
            self._unary()

    def _unary(self) -> None:
        with self.client.post(
            PATH, data=self._body(False), headers=self.headers, name="chat", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                answer = resp.json()
            except ValueError:
                resp.failure("not JSON")
                return
            if not answer.get("choices"):
                resp.failure("no choices in the answer")

    def _stream(self) -> None:
        started = time.perf_counter()
        headers = {**self.headers, "Accept": "text/event-stream"}
        body = self._body(True)
        with self.client.post(
            PATH,
            data=body,
            headers=headers,
            name="chat (stream) first byte",
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                content = b"".join(resp.iter_content(decode_content=False))
                resp.failure(f"HTTP {resp.status_code}: {content[:200]!r}")
                return
            received = 0
            error: str | None = None
            tail = b""
            try:
                for chunk in resp.iter_content(chunk_size=16 * 1024, decode_content=False):
                    received += len(chunk)
                    if b'"error"' in chunk and error is None:
                        error = "error event in the stream"
                    tail = (tail + chunk)[-64:]
            except Exception as exc:  # the connection dropped mid-stream
                error = f"stream broken: {exc!r}"
            if error is None and not tail.rstrip().endswith(b"data: [DONE]"):
                error = "stream ended without data: [DONE]"
        self.environment.events.request.fire(
            request_type="POST",
            name="chat (stream) complete",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=received,
            response=None,
            context={},
            exception=RuntimeError(error) if error else None,
        )
