"""Load test for ``gptevo serve``: N concurrent streaming clients on the loopback interface.

    python tools/load_test.py --url http://127.0.0.1:8000 [--clients 1,4,16] [--requests 2]
                              [--max-tokens 64] [--prompt TEXT] [--time-limit 120] [--json]
    python tools/load_test.py --start "--backend numba" ...   # starts gptevo serve itself (port 0)

After ``--warmup`` unmeasured requests, for each client count N, N clients each send ``--requests``
streaming ``/v1/completions`` requests one after the other (greedy, ``max_tokens`` tokens,
``stream_options.include_usage``), all N at once. Per level it prints:

- aggregate tok/s: completion tokens of every finished request (from ``usage``) / the level's wall time;
- TTFT p50/p99: request sent -> first text chunk;
- per-token latency p50/p99: the gaps between consecutive text chunks (a chunk carries one token's text,
  or several when a token ends inside a UTF-8 character or a possible stop string);
- errors and unfinished requests.

Bounded: at most 64 clients, 100 requests per client, 4096 tokens per request, and ``--time-limit``
seconds per level (requests still running then are abandoned and counted as unfinished). Only loopback
URLs are accepted. The client is a minimal asyncio HTTP/1.1 reader (no client library), so it costs the
server's CPU as little as possible.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

LIMITS = {"clients": 64, "requests": 100, "max_tokens": 4096}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Result:
    def __init__(self):
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self.tokens = 0
        self.error: str | None = None
        self.done = False


async def one_request(host: str, port: int, body: bytes, headers: str) -> Result:
    r = Result()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n".encode() + body)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            rest = await reader.read(2000)
            r.error = (status + rest).decode(errors="replace").splitlines()[0][:200]
            return r
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
        last = None
        buf = b""
        while True:
            if chunked:                                               # HTTP/1.1 chunked framing
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                data = data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                line = event[len(b"data: "):]
                if line.startswith(b"[DONE]"):
                    r.done = True
                    continue
                obj = json.loads(line)
                if "error" in obj:
                    r.error = obj["error"].get("message", "error")[:200]
                    continue
                if obj.get("usage"):
                    r.tokens = obj["usage"]["completion_tokens"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    now = time.perf_counter()
                    if r.ttft is None:
                        r.ttft = now - t0
                    else:
                        r.gaps.append(now - last)
                    last = now
    finally:
        writer.close()
    return r


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


async def level(host, port, n_clients, n_requests, body, headers, time_limit) -> dict:
    results: list[Result] = []

    async def client():
        for _ in range(n_requests):
            try:
                results.append(await one_request(host, port, body, headers))
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                bad = Result()
                bad.error = f"{type(exc).__name__}: {exc}"
                results.append(bad)

    start = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(n_clients)]
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    ok = [r for r in results if r.done and r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    return {"clients": n_clients, "requests_ok": len(ok), "errors": sum(r.error is not None for r in results),
            "unfinished": n_clients * n_requests - len(results), "wall_s": wall, "tokens": tokens,
            "tok_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "token_latency_p50_s": percentile(gaps, 50), "token_latency_p99_s": percentile(gaps, 99),
            "first_error": next((r.error for r in results if r.error), None)}


def start_server(extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "gptevo.cli", "serve", "--port", "0", "--log-level", "warning", *extra.split()]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        sys.stderr.write(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("load_test: the server did not start")


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--start", default=None, metavar="ARGS",
                   help="start 'gptevo serve --port 0 ARGS' for the test and stop it after")
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after the other (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    p.add_argument("--prompt", default="It is a truth universally acknowledged", help="the prompt")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per client count (default 120)")
    p.add_argument("--api-key", default=os.environ.get("GPTEVO_API_KEY"), help="bearer token (default $GPTEVO_API_KEY)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the first level (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or any(not 1 <= c <= LIMITS["clients"] for c in counts):
        p.error(f"--clients: each count must be in [1, {LIMITS['clients']}]")
    if not 1 <= args.requests <= LIMITS["requests"]:
        p.error(f"--requests must be in [1, {LIMITS['requests']}]")
    if not 1 <= args.max_tokens <= LIMITS["max_tokens"]:
        p.error(f"--max-tokens must be in [1, {LIMITS['max_tokens']}]")
    proc = None
    url = args.url
    if args.start is not None:
        proc, url = start_server(args.start)
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        p.error(f"--url must be on the loopback interface ({', '.join(LOOPBACK)}), got {parts.hostname}")
    body = json.dumps({"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    headers = f"Authorization: Bearer {args.api_key}\r\n" if args.api_key else ""
    rows = []
    try:
        warm = json.dumps({"prompt": args.prompt, "max_tokens": 4, "temperature": 0, "stream": True}).encode()
        for _ in range(args.warmup):                 # compilation and first-use costs, not measured
            r = asyncio.run(one_request(parts.hostname, parts.port or 80, warm, headers))
            if r.error:
                raise SystemExit(f"load_test: the warm-up request failed: {r.error}")
        for n in counts:
            rows.append(asyncio.run(level(parts.hostname, parts.port or 80, n, args.requests, body, headers,
                                          args.time_limit)))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if args.json:
        print(json.dumps({"url": url, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
                          "levels": rows}, indent=2))
        return 0
    base = rows[0]["tok_per_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"{url}  max_tokens={args.max_tokens}  requests/client={args.requests}")
    print(f"{'clients':>7} {'ok':>4} {'err':>4} {'unfin':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'x1':>5} "
          f"{'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'tok p50 ms':>10} {'tok p99 ms':>10}")
    for r in rows:
        speedup = f"{r['tok_per_s'] / base:.2f}" if base else "-"
        print(f"{r['clients']:>7} {r['requests_ok']:>4} {r['errors']:>4} {r['unfinished']:>5} {r['tokens']:>7} "
              f"{r['wall_s']:>7.2f} {r['tok_per_s']:>8.1f} {speedup:>5} {fmt_ms(r['ttft_p50_s']):>11} "
              f"{fmt_ms(r['ttft_p99_s']):>11} {fmt_ms(r['token_latency_p50_s']):>10} "
              f"{fmt_ms(r['token_latency_p99_s']):>10}")
        if r["first_error"]:
            print(f"        first error: {r['first_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
