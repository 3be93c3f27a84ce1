#!/usr/bin/env python3
"""HTTP load test client for `expertflow serve` (used by scripts/bench/load_test.sh).

Sends --requests requests, --concurrency at a time, over real HTTP/1.1 connections (asyncio
sockets, one connection per request, as many OpenAI clients do without keep-alive). Requests
cycle through every (prompt, endpoint, streaming) combination: completions and chat, streaming
(SSE) and not, greedy (temperature 0). Each response's text is compared with the expected text
(what `expertflow generate` printed for the same prompt).

Exit status 1 when any request is lost (connection error or timeout), gets an HTTP error or
a malformed response, or answers a text other than the expected one.
"""
import argparse
import asyncio
import json
import statistics
import sys
import time


def build_body(kind, prompt, stream, max_tokens, model):
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def dechunk(data):
    """Decodes a Transfer-Encoding: chunked body."""
    out, pos = bytearray(), 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            return bytes(out)
        out += data[pos:pos + size]
        pos += size + 2


def parse_response(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    elif "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return status, headers, body


def response_text(kind, stream, body):
    """The generated text and completion token count of a 200 response."""
    if not stream:
        j = json.loads(body)
        choice = j["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        return text, j["usage"]["completion_tokens"]
    text, tokens, done = [], None, False
    for event in body.decode("utf-8").split("\n\n"):
        event = event.strip()
        if not event:
            continue
        if not event.startswith("data: "):
            raise ValueError("SSE event without data: %r" % event[:80])
        data = event[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        j = json.loads(data)
        if j.get("usage"):
            tokens = j["usage"]["completion_tokens"]
        for choice in j.get("choices", []):
            piece = choice.get("delta", {}).get("content") if kind == "chat" else choice.get("text")
            if piece:
                text.append(piece)
    if not done:
        raise ValueError("stream ended without data: [DONE]")
    return "".join(text), tokens


async def one_request(args, i, prompt_index, kind, stream, results):
    prompt = args.prompts[prompt_index]
    body = json.dumps(build_body(kind, prompt, stream, args.max_tokens, args.model)).encode()
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    request = (f"POST {path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    rec = {"i": i, "prompt": prompt_index, "kind": kind, "stream": stream}
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(args.host, args.port), args.timeout)
        writer.write(request)
        await writer.drain()
        first = await asyncio.wait_for(reader.read(1), args.timeout)
        rec["ttfb_s"] = time.perf_counter() - t0
        rest = await asyncio.wait_for(reader.read(), args.timeout)
        writer.close()
        rec["latency_s"] = time.perf_counter() - t0
        status, _, payload = parse_response(first + rest)
        rec["status"] = status
        if status != 200:
            rec["outcome"] = "http_error"
            rec["detail"] = payload[:200].decode("utf-8", "replace")
        else:
            text, tokens = response_text(kind, stream, payload)
            rec["tokens"] = tokens or 0
            expected = args.expected[kind][prompt_index]
            rec["outcome"] = "ok" if text == expected else "mismatch"
            if text != expected:
                rec["detail"] = "got %r, expected %r" % (text, expected)
    except (asyncio.TimeoutError, OSError) as e:
        rec["outcome"] = "lost"
        rec["detail"] = repr(e)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        rec["outcome"] = "malformed"
        rec["detail"] = repr(e)
    results.append(rec)


async def run(args):
    combos = [(p, kind, stream) for stream in (False, True) for kind in ("completion", "chat")
              for p in range(len(args.prompts))]
    sem = asyncio.Semaphore(args.concurrency)
    results = []

    async def limited(i):
        p, kind, stream = combos[i % len(combos)]
        async with sem:
            await one_request(args, i, p, kind, stream, results)

    t0 = time.perf_counter()
    await asyncio.gather(*(limited(i) for i in range(args.requests)))
    return results, time.perf_counter() - t0


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True, help="served model name")
    ap.add_argument("--expected", required=True,
                    help="JSON {prompts: [...], completion: [text...], chat: [text...]}")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request step")
    ap.add_argument("--json", help="write the summary and every request's record here")
    args = ap.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("load_test.py: loopback hosts only")
    with open(args.expected) as f:
        exp = json.load(f)
    args.prompts = exp["prompts"]
    args.expected = {"completion": exp["completion"], "chat": exp["chat"]}

    results, wall = asyncio.run(run(args))
    by = {}
    for r in results:
        by[r["outcome"]] = by.get(r["outcome"], 0) + 1
    ok = [r for r in results if r["outcome"] in ("ok", "mismatch")]
    lat = [r["latency_s"] for r in ok]
    lat_stream = [r["latency_s"] for r in ok if r["stream"]]
    lat_plain = [r["latency_s"] for r in ok if not r["stream"]]
    ttfb_stream = [r["ttfb_s"] for r in ok if r["stream"]]
    tokens = sum(r.get("tokens", 0) for r in ok)
    summary = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "distinct_prompts": len(args.prompts),
        "answered": len(results),
        "ok": by.get("ok", 0),
        "mismatch": by.get("mismatch", 0),
        "http_error": by.get("http_error", 0),
        "malformed": by.get("malformed", 0),
        "lost": by.get("lost", 0) + (args.requests - len(results)),
        "wall_s": wall,
        "throughput_req_s": len(ok) / wall,
        "throughput_tok_s": tokens / wall,
        "completion_tokens": tokens,
        "latency_p50_s": percentile(lat, 0.5),
        "latency_p90_s": percentile(lat, 0.9),
        "latency_p99_s": percentile(lat, 0.99),
        "latency_max_s": max(lat) if lat else float("nan"),
        "latency_mean_s": statistics.mean(lat) if lat else float("nan"),
        "latency_p50_plain_s": percentile(lat_plain, 0.5),
        "latency_p99_plain_s": percentile(lat_plain, 0.99),
        "latency_p50_stream_s": percentile(lat_stream, 0.5),
        "latency_p99_stream_s": percentile(lat_stream, 0.99),
        "ttfb_p50_stream_s": percentile(ttfb_stream, 0.5),
        "ttfb_p99_stream_s": percentile(ttfb_stream, 0.99),
    }
    print("# load_test.py: %d requests, concurrency %d, max_tokens %d, %d prompts x {completion, chat} x "
          "{plain, stream}" % (args.requests, args.concurrency, args.max_tokens, len(args.prompts)))
    print("%-10s %6s %6s %6s %6s %6s %9s %9s %9s %9s %9s" %
          ("answered", "ok", "mism", "http", "malf", "lost", "p50_s", "p99_s", "max_s", "req/s", "tok/s"))
    print("%-10d %6d %6d %6d %6d %6d %9.3f %9.3f %9.3f %9.1f %9.1f" %
          (summary["answered"], summary["ok"], summary["mismatch"], summary["http_error"], summary["malformed"],
           summary["lost"], summary["latency_p50_s"], summary["latency_p99_s"], summary["latency_max_s"],
           summary["throughput_req_s"], summary["throughput_tok_s"]))
    for r in results:
        if r["outcome"] != "ok":
            print("request %d (%s, stream=%s, prompt %d): %s: %s" %
                  (r["i"], r["kind"], r["stream"], r["prompt"], r["outcome"], r.get("detail", "")), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "requests": sorted(results, key=lambda r: r["i"])}, f, indent=1)
    bad = summary["ok"] != args.requests
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
