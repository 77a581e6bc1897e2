#!/usr/bin/env python3
"""POST /prompt -> execution_success: sakuga's ComfyUI API side by side with ComfyUI.

Issue 16's benchmark. One invocation starts both servers (or attaches to running ones),
then runs the same client against each, interleaved: per round, sakuga with 1 client,
ComfyUI with 1 client, sakuga with 8 clients, ComfyUI with 8 clients. Each configuration
sends `--prompts` prompts in all (default 500), split across its clients; every client
keeps one prompt in flight (submit, wait for its `execution_success` on the client's own
`/ws?clientId=`, submit the next). The figures are the medians over the rounds.

The prompt is model-free and exists in both servers: EmptyImage (64x64, batch 1) ->
SaveImage. Every prompt gets its own `color` (a counter over the whole run), so neither
server can answer it from a cache. Each configuration saves into its own subfolder
(`filename_prefix` "r{round}c{clients}/img"): ComfyUI lists the folder to number every
save, and one growing folder would slow it down round after round.

Measured per configuration and server:
  completions/s  prompts / (first submit .. last execution_success), wall clock
  p50, p99       submit (just before POST /prompt) -> execution_success received, per prompt
  CPU/job        (utime+stime of the server process over the run) / prompts, from
                 /proc/PID/stat (clock ticks, so +-10 ms over the run: +-0.02 ms/job at 500)
  client CPU/job the benchmark client's own CPU (os.times) over the run / prompts: the
                 client shares the machine, so it bounds what any server can show
  idle RSS       VmRSS of the server process once it answers HTTP and has sat idle for
                 --idle-wait seconds, before any prompt (sakuga with the HTTP side on)

Usage, starting both servers (sakuga with a fresh temporary --data-dir, so its embedded
journal is on; ComfyUI with --cpu):

  python scripts/bench_comfy.py \\
      --sakuga-bin target/release/sakuga \\
      --comfy-dir /path/to/ComfyUI --comfy-python /path/to/venv/bin/python

or attaching to servers already running (give each URL and PID; idle RSS is then read
when the script starts):

  python scripts/bench_comfy.py --sakuga-url http://127.0.0.1:8189 --sakuga-pid PID \\
      --comfy-url http://127.0.0.1:8190 --comfy-pid PID

Needs `aiohttp` (ComfyUI's own requirement, so its venv has it). Prints a Markdown table
and writes the raw per-configuration results as JSON with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")


def workflow(color: int, prefix: str) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": prefix},
        },
    }


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after it are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Counter:
    """Distinct `color` values across the whole run (EmptyImage's max is 0xFFFFFF)."""

    def __init__(self) -> None:
        self.n = int(time.time()) % 1_000_000

    def next(self) -> int:
        self.n = (self.n + 1) % 0x1000000
        return self.n


async def client(session, url, count, colors, prefix, latencies, errors):
    cid = uuid.uuid4().hex
    ws_url = url.replace("http", "ws", 1) + f"/ws?clientId={cid}"
    done: dict[str, float] = {}
    waiting: dict[str, asyncio.Future] = {}
    async with session.ws_connect(ws_url, max_msg_size=0) as ws:

        async def reader():
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                kind = m.get("type")
                if kind not in ("execution_success", "execution_error"):
                    continue
                pid = m["data"].get("prompt_id")
                now = time.perf_counter()
                ok = kind == "execution_success"
                # The success may come before the POST's answer (sakuga relays at once).
                if pid in waiting:
                    waiting.pop(pid).set_result((now, ok))
                else:
                    done[pid] = (now, ok)

        reading = asyncio.create_task(reader())
        # The connect-time `status` arrives first; give it a moment so it is not counted.
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        for _ in range(count):
            body = {"prompt": workflow(colors.next(), prefix), "client_id": cid}
            t0 = time.perf_counter()
            async with session.post(url + "/prompt", json=body) as r:
                answer = await r.json()
                if r.status != 200:
                    errors.append(answer)
                    continue
            pid = answer["prompt_id"]
            if pid in done:
                t1, ok = done.pop(pid)
            else:
                fut = loop.create_future()
                waiting[pid] = fut
                t1, ok = await asyncio.wait_for(fut, 60)
            if ok:
                latencies.append(t1 - t0)
            else:
                errors.append(pid)
        reading.cancel()


async def run_config(url, pid, clients, prompts, colors, prefix):
    latencies: list[float] = []
    errors: list = []
    per = [prompts // clients + (1 if i < prompts % clients else 0) for i in range(clients)]
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        cpu0 = cpu_seconds(pid)
        own0 = os.times()
        t0 = time.perf_counter()
        await asyncio.gather(
            *(client(session, url, n, colors, prefix, latencies, errors) for n in per)
        )
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
        own1 = os.times()
        own = own1.user + own1.system - own0.user - own0.system
    lat = sorted(latencies)

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000

    return {
        "clients": clients,
        "completed": len(lat),
        "errors": len(errors),
        "wall_s": wall,
        "completions_per_s": len(lat) / wall,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "cpu_ms_per_job": cpu * 1000 / max(1, len(lat)),
        "client_cpu_ms_per_job": own * 1000 / max(1, len(lat)),
    }


async def wait_http(url, timeout):
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/system_stats") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def start_servers(args, tmp):
    procs = {}
    if args.sakuga_bin:
        data = os.path.join(tmp, "sakuga")
        cmd = [
            args.sakuga_bin, "serve", "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--comfy-listen", f"127.0.0.1:{args.sakuga_port}",
            "--data-dir", data, "--out", os.path.join(data, "out"),
            "--input-dir", os.path.join(data, "in"),
        ]
        os.makedirs(os.path.join(data, "in"), exist_ok=True)
        log = open(os.path.join(tmp, "sakuga.log"), "w")
        procs["sakuga"] = subprocess.Popen(cmd, stdout=log, stderr=log)
        args.sakuga_url = f"http://127.0.0.1:{args.sakuga_port}"
        args.sakuga_pid = procs["sakuga"].pid
    if args.comfy_dir:
        out = os.path.join(tmp, "comfy-out")
        cmd = [
            args.comfy_python, "main.py", "--cpu", "--listen", "127.0.0.1",
            "--port", str(args.comfy_port), "--disable-auto-launch",
            "--output-directory", out, "--temp-directory", os.path.join(tmp, "comfy-temp"),
        ]
        log = open(os.path.join(tmp, "comfy.log"), "w")
        procs["comfy"] = subprocess.Popen(cmd, cwd=args.comfy_dir, stdout=log, stderr=log)
        args.comfy_url = f"http://127.0.0.1:{args.comfy_port}"
        args.comfy_pid = procs["comfy"].pid
    return procs


def table(results, rss):
    rows = [
        "| server | clients | completions/s | p50 ms | p99 ms | server CPU ms/job "
        "| client CPU ms/job | idle RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians = {}
    for (server, clients), runs in sorted(results.items()):
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("completions_per_s", "p50_ms", "p99_ms", "cpu_ms_per_job",
                         "client_cpu_ms_per_job")}
        medians[(server, clients)] = med
        rows.append(
            f"| {server} | {clients} | {med['completions_per_s']:.1f} | {med['p50_ms']:.2f} "
            f"| {med['p99_ms']:.2f} | {med['cpu_ms_per_job']:.3f} "
            f"| {med['client_cpu_ms_per_job']:.3f} | {rss[server]:.0f} |"
        )
    lines = ["\n".join(rows), ""]
    for clients in sorted({c for _, c in results}):
        s, c = medians.get(("sakuga", clients)), medians.get(("comfyui", clients))
        if s and c:
            lines.append(f"{clients} client(s): sakuga/ComfyUI completions/s = "
                         f"{s['completions_per_s'] / c['completions_per_s']:.1f}x")
    return "\n".join(lines)


async def main_async(args):
    tmp = tempfile.mkdtemp(prefix="bench-comfy-")
    procs = start_servers(args, tmp)
    try:
        servers = []
        if args.sakuga_url:
            servers.append(("sakuga", args.sakuga_url.rstrip("/"), args.sakuga_pid))
        if args.comfy_url:
            servers.append(("comfyui", args.comfy_url.rstrip("/"), args.comfy_pid))
        for _, url, _ in servers:
            await wait_http(url, args.start_timeout)
        await asyncio.sleep(args.idle_wait)
        rss = {name: rss_mib(pid) for name, _, pid in servers}
        colors = Counter()
        for name, url, pid in servers:
            if args.warmup > 0:
                await run_config(url, pid, 1, args.warmup, colors, "warmup/img")
        results: dict = {}
        for rnd in range(args.rounds):
            for clients in args.clients:
                for name, url, pid in servers:
                    prefix = f"r{rnd}c{clients}/img"
                    r = await run_config(url, pid, clients, args.prompts, colors, prefix)
                    r.update(server=name, round=rnd)
                    results.setdefault((name, clients), []).append(r)
                    print(f"round {rnd} {name:7} {clients} client(s): "
                          f"{r['completions_per_s']:7.1f}/s p50 {r['p50_ms']:6.2f} ms "
                          f"p99 {r['p99_ms']:6.2f} ms cpu {r['cpu_ms_per_job']:.3f} ms/job "
                          f"client {r['client_cpu_ms_per_job']:.3f} ms/job "
                          f"errors {r['errors']}", flush=True)
        print()
        print(table(results, rss))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rss_mib": rss, "runs": [r for v in results.values() for r in v]},
                          f, indent=1)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep_tmp:
            print(f"logs and outputs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sakuga-bin", help="start sakuga from this binary")
    p.add_argument("--sakuga-port", type=int, default=8189)
    p.add_argument("--sakuga-url", help="attach to a running sakuga's ComfyUI API")
    p.add_argument("--sakuga-pid", type=int)
    p.add_argument("--comfy-dir", help="start ComfyUI from this checkout (main.py)")
    p.add_argument("--comfy-python", default=sys.executable)
    p.add_argument("--comfy-port", type=int, default=8190)
    p.add_argument("--comfy-url", help="attach to a running ComfyUI")
    p.add_argument("--comfy-pid", type=int)
    p.add_argument("--prompts", type=int, default=500)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20, help="prompts per server first, unmeasured")
    p.add_argument("--idle-wait", type=float, default=5.0)
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args()
    for name in ("sakuga", "comfy"):
        if getattr(args, f"{name}_url") and not getattr(args, f"{name}_pid"):
            p.error(f"--{name}-url needs --{name}-pid (for CPU and RSS)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
