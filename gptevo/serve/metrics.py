"""Server counters and gauges, rendered in Prometheus' text exposition format (version 0.0.4).

Metrics (all prefixed ``gptevo_``):

- ``requests_total{endpoint, status}``: answered requests by endpoint and HTTP status (counter);
- ``requests_cancelled_total``: generations cancelled because the client went away (counter);
- ``prompt_tokens_total``, ``generated_tokens_total``: tokens in and out (counters);
- ``queue_depth``: requests waiting for a place in the batch (gauge);
- ``batch_size``: sequences in the running batch after the last step (gauge);
- ``tokens_per_second``: tokens generated over the last ``window_s`` seconds / the window (gauge);
- ``time_to_first_token_seconds``: summary (count and sum) of the time from admission to first token.

The engine thread and the event loop both update it, so every change takes one lock.
"""
from __future__ import annotations

import threading
import time
from collections import deque


class Metrics:
    def __init__(self, window_s: float = 10.0, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.window_s = window_s
        self.requests: dict[tuple[str, int], int] = {}
        self.cancelled = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.queue_depth = 0
        self.batch_size = 0
        self.ttft_count = 0
        self.ttft_sum = 0.0
        self._recent: deque[tuple[float, int]] = deque()      # (time, tokens of one step)

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, int(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def add(self, **counts) -> None:
        """Add to counters by name (``cancelled``, ``prompt_tokens``)."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_count += 1
            self.ttft_sum += seconds

    def step(self, tokens: int, batch_size: int, queue_depth: int) -> None:
        """One decode step of the engine: ``tokens`` generated, the batch and queue after it."""
        now = self._clock()
        with self._lock:
            self.generated_tokens += tokens
            self.batch_size = batch_size
            self.queue_depth = queue_depth
            if tokens:
                self._recent.append((now, tokens))
            self._trim(now)

    def set_queue_depth(self, n: int) -> None:
        with self._lock:
            self.queue_depth = n

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        with self._lock:
            self._trim(self._clock())
            return sum(n for _, n in self._recent) / self.window_s

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        tps = self.tokens_per_second()
        with self._lock:
            lines = ["# HELP gptevo_requests_total Requests answered, by endpoint and HTTP status.",
                     "# TYPE gptevo_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'gptevo_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')

            def one(name, kind, help_, value):
                lines.extend([f"# HELP gptevo_{name} {help_}", f"# TYPE gptevo_{name} {kind}",
                              f"gptevo_{name} {value}"])

            one("requests_cancelled_total", "counter", "Generations cancelled because the client went away.",
                self.cancelled)
            one("prompt_tokens_total", "counter", "Prompt tokens admitted.", self.prompt_tokens)
            one("generated_tokens_total", "counter", "Tokens generated.", self.generated_tokens)
            one("queue_depth", "gauge", "Requests waiting for a place in the batch.", self.queue_depth)
            one("batch_size", "gauge", "Sequences in the running batch.", self.batch_size)
            one("tokens_per_second", "gauge", f"Tokens generated per second over the last {self.window_s:g} s.",
                f"{tps:.3f}")
            lines += ["# HELP gptevo_time_to_first_token_seconds Time from admission to the first token.",
                      "# TYPE gptevo_time_to_first_token_seconds summary",
                      f"gptevo_time_to_first_token_seconds_count {self.ttft_count}",
                      f"gptevo_time_to_first_token_seconds_sum {self.ttft_sum:.6f}"]
        return "\n".join(lines) + "\n"
