"""Benchmark of `chunbot sim serve`: how many requests per second it answers on one core.

The sim is the server of chunbot's throughput benchmarks, so it must not be their
bottleneck. The server is pinned to core 1 and wrk (one thread) to core 0; wrk POSTs a
chat request with a prompt of about 200 tokens, 10 s per point, over 64, 256 and 1,024
connections to the OpenAI route, and one point each for the Anthropic route and OpenAI
streaming. Server CPU per request comes from /proc, so a figure limited by wrk rather
than by the server shows as a server CPU share well below 100%.

    python bench/sim_server.py                  # all points, 10 s each
    python bench/sim_server.py --duration 3     # quicker

Needs wrk (`apt-get install -y wrk`) and taskset (util-linux).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REVIEW = ("I bought this kettle three weeks ago and I have mixed feelings about it. The build "
          "quality is solid and it boils water fast, but the lid is stiff and the handle gets "
          "hot after a couple of minutes. The instructions were confusing and the packaging "
          "was damaged when it arrived, although the kettle itself was fine. Customer service "
          "answered quickly and offered a discount on my next order. The sound it makes when "
          "it finishes is loud enough to hear from the next room, which I like. The price was "
          "fair for what you get, and the cord is long enough for my counter. Overall it does "
          "the job, but I expected a little more for a brand with this reputation.")

# wrk calls done() once at the end: print what we need as one JSON line to parse.
LUA = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"

done = function(summary, latency, requests)
  io.write(string.format(
    '\\nRESULT {"requests": %%d, "seconds": %%f, "errors": %%d, "non2xx": %%d, ' ..
    '"p50_ms": %%f, "p99_ms": %%f}\\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def request_body(route: str, stream: bool) -> str:
    body: dict = {"model": "sim-small", "max_tokens": 120, "temperature": 0,
                  "messages": [{"role": "user",
                                "content": f"Write a two-line apology for: {REVIEW}"}]}
    system = "You are a support agent for a kitchen appliance shop. Be brief and kind."
    if route == "chat":
        body["messages"].insert(0, {"role": "system", "content": system})
    else:
        body["system"] = system
    if stream:
        body["stream"] = True
    return json.dumps(body)


def start_server() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "chunbot_cli", "sim",
                                "serve", "--port", "0"], stdout=subprocess.PIPE)
    line = process.stdout.readline().decode()
    if "listening on " not in line:
        process.kill()
        raise SystemExit(f"sim serve did not start: {line!r}")
    return process, line.split("listening on ", 1)[1].strip()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(url: str) -> dict:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def run_wrk(url: str, route: str, stream: bool, connections: int,
            duration: float, workdir: Path) -> dict:
    script = workdir / f"{route}-{int(stream)}.lua"
    script.write_text(LUA % {"body": json.dumps(request_body(route, stream))})
    endpoint = url + ("/v1/chat/completions" if route == "chat" else "/v1/messages")
    out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}",
                          f"-d{duration:g}s", "--timeout", "10s", "-s", str(script), endpoint],
                         capture_output=True, text=True, check=True).stdout
    result_line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(result_line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per point")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: install it (apt-get install -y {tool})")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores: the server on core 1, wrk on core 0")

    points = [("chat", False, 64), ("chat", False, 256), ("chat", False, 1024),
              ("messages", False, 256), ("chat", True, 256)]
    process, url = start_server()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_wrk(url, "chat", False, 64, 1, Path(tmp))  # warm-up
            for route, stream, connections in points:
                post(f"{url}/stats/reset")
                cpu_before = cpu_seconds(process.pid)
                result = run_wrk(url, route, stream, connections, args.duration, Path(tmp))
                cpu = cpu_seconds(process.pid) - cpu_before
                stats = json.loads(urllib.request.urlopen(f"{url}/stats", timeout=10).read())
                rows.append((route + (" SSE" if stream else ""), connections, result, cpu, stats))
                time.sleep(0.5)  # let closed connections drain before the next point
    finally:
        process.terminate()
        process.wait(timeout=10)

    print(f"chunbot sim serve on one core (taskset -c 1), wrk -t1 on core 0, "
          f"{args.duration:g} s per point, ~200-token prompt")
    print(f"{'route':<10} {'conns':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server CPU':>10} {'CPU µs/req':>10} {'errors':>7}")
    for name, connections, result, cpu, stats in rows:
        rate = result["requests"] / result["seconds"]
        per_request = cpu / max(1, stats["answered"]) * 1e6
        errors = result["errors"] + result["non2xx"]
        print(f"{name:<10} {connections:>6} {rate:>8,.0f} {result['p50_ms']:>8.1f} "
              f"{result['p99_ms']:>8.1f} {cpu / result['seconds']:>9.0%} "
              f"{per_request:>10.0f} {errors:>7}")


if __name__ == "__main__":
    main()
