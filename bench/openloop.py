#!/usr/bin/env python3
"""Open-loop (fixed-rate) HTTP/1.1 load generator, standard library only.

Why this exists: wrk is closed-loop (each connection sends its next request
only after the previous answer), so a slow server quietly receives fewer
requests and its latency looks better than what clients would see
("coordinated omission"). Debian ships no open-loop tool (no wrk2, no oha),
so this script does the job.

How it works:
  * N keep-alive connections are opened before the clock starts.
  * Request i is *scheduled* at t0 + i / rate, whatever happened before.
  * A due request goes out on an idle connection at once; if every connection
    is busy it waits in a FIFO backlog (that wait is part of its latency).
  * Latency = response fully read - scheduled time (not actual send time), so
    a stalled server is charged for every request it delayed.
  * One asyncio event loop with asyncio.Protocol callbacks: no coroutine or
    future per request, which keeps the per-request cost low enough for a few
    thousand req/s on one core.

Timer precision: the loop uses select() (microsecond timeouts) rather than
epoll (millisecond timeouts, which would release requests up to 1 ms late and
swamp a proxy's ~100 us). The kernel still wakes us a little late (timer
slack, scheduling); that delay is reported as gen_lag_* so it can be told
apart from the server's latency, and it is the same for every target.

Output: human summary on stderr, and one machine-readable line on stdout:
  RESULT rps=... p50_us=... p99_us=... errors=... (and more key=value pairs)
"""

import argparse
import asyncio
import collections
import selectors
import sys
import time
import urllib.parse


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list (0 if empty)."""
    if not sorted_vals:
        return 0.0
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


class Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time (no pipelining)."""

    def __init__(self, gen):
        self.gen = gen
        self.transport = None
        self.buf = bytearray()
        self.busy = False
        self.sched = 0.0     # scheduled send time of the in-flight request
        self.sent_at = 0.0   # actual send time of the in-flight request
        self._reset_parser()

    def _reset_parser(self):
        self.in_body = False  # False: reading status line + headers
        self.status = 0
        self.remaining = 0    # body bytes still expected (Content-Length mode)
        self.chunked = False
        self.close_after = False

    # --- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.transport = None
        self.gen.on_conn_lost(self)

    def data_received(self, data):
        self.buf += data
        try:
            while self._parse_one():
                pass
        except (ValueError, IndexError) as e:  # garbage from the server
            self.gen.protocol_errors += 1
            if self.gen.verbose:
                print(f"openloop: bad response: {e!r}", file=sys.stderr)
            self.transport.abort()

    # --- sending -----------------------------------------------------------
    def send(self, sched):
        self.busy = True
        self.sched = sched
        self.sent_at = self.gen.loop.time()
        self.transport.write(self.gen.request)

    # --- minimal HTTP/1.1 response parser ----------------------------------
    def _parse_one(self):
        """Consume as much of one response as is buffered; True when one completed."""
        buf = self.buf
        if not self.in_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end])
            del buf[: end + 4]
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            self.remaining = 0
            self.chunked = False
            self.close_after = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.remaining = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    self.close_after = True
            self.in_body = True
        if self.chunked:
            # Read chunk by chunk; `remaining` holds the size of the current
            # chunk's data + CRLF once its size line has been read.
            while True:
                if self.remaining:
                    if len(buf) < self.remaining:
                        return False
                    del buf[: self.remaining]
                    self.remaining = 0
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return False
                size = int(bytes(buf[:eol]).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # Last chunk: skip optional trailers up to the empty line.
                    if buf[eol + 2 : eol + 4] == b"\r\n":
                        del buf[: eol + 4]
                        break
                    t_end = buf.find(b"\r\n\r\n", eol)
                    if t_end < 0:
                        return False
                    del buf[: t_end + 4]
                    break
                del buf[: eol + 2]
                self.remaining = size + 2
        else:
            if len(buf) < self.remaining:
                return False
            del buf[: self.remaining]
        status, close_after = self.status, self.close_after
        self._reset_parser()
        self.busy = False
        self.gen.on_response(self, status)
        if close_after and self.transport is not None:
            self.transport.close()  # connection_lost() will replace it
        return True


class Gen:
    def __init__(self, args):
        u = urllib.parse.urlsplit(args.url)
        if u.scheme != "http":
            sys.exit("openloop: only http:// URLs are supported")
        self.host = u.hostname
        self.port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        body = args.body.encode()
        self.request = (
            f"{args.method} {path} HTTP/1.1\r\n"
            f"Host: {u.netloc}\r\n"
            f"Content-Type: {args.content_type}\r\n"
            + "".join(f"{h}\r\n" for h in args.header)
            +             f"Content-Length: {len(body)}\r\n"
            f"\r\n"
        ).encode() + body
        self.rate = float(args.rate)
        self.duration = float(args.duration)
        self.total = int(self.rate * self.duration)
        self.nconns = args.connections
        self.drain = args.drain
        self.verbose = args.verbose
        self.loop = None
        self.conns = set()
        self.idle = []
        self.backlog = collections.deque()
        self.released = 0          # requests whose scheduled time has been reached
        self.t0 = 0.0
        self.closing = False
        # results
        self.lat = []              # s, completion - scheduled time (the headline)
        self.svc = []              # s, completion - actual send time
        self.gen_lag = []          # s, release by the scheduler - scheduled time
        self.ok = 0
        self.non2xx = 0
        self.conn_errors = 0       # in-flight requests lost with their connection
        self.protocol_errors = 0   # unparsable responses (their connection is aborted)
        self.last_done = 0.0
        self.finished = None       # future set when every request is accounted for

    # --- connection management ---------------------------------------------
    async def open_conn(self):
        _, proto = await self.loop.create_connection(lambda: Conn(self), self.host, self.port)
        self.conns.add(proto)
        self._make_idle(proto)

    def _make_idle(self, conn):
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def on_conn_lost(self, conn):
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.busy:
            conn.busy = False
            self.conn_errors += 1
            self._check_finished()
        if not self.closing:
            self.loop.create_task(self._reconnect())

    async def _reconnect(self):
        try:
            await self.open_conn()
        except OSError as e:
            if self.verbose:
                print(f"openloop: reconnect failed: {e}", file=sys.stderr)
            await asyncio.sleep(0.05)
            if not self.closing:
                self.loop.create_task(self._reconnect())

    # --- scheduling ----------------------------------------------------------
    def pump(self):
        """Release every request whose scheduled time has come."""
        now = self.loop.time()
        due = min(self.total, int((now - self.t0) * self.rate) + 1)
        while self.released < due:
            sched = self.t0 + self.released / self.rate
            self.released += 1
            self.gen_lag.append(now - sched)
            if self.idle:
                self.idle.pop().send(sched)
            else:
                self.backlog.append(sched)

    def _tick(self):
        self.pump()
        if self.released < self.total:
            self.loop.call_at(self.t0 + self.released / self.rate, self._tick)

    def on_response(self, conn, status):
        now = self.loop.time()
        self.lat.append(now - conn.sched)
        self.svc.append(now - conn.sent_at)
        self.last_done = now
        if 200 <= status < 300:
            self.ok += 1
        else:
            self.non2xx += 1
        # Responses are frequent: use them to release due requests without
        # waiting for the next timer wake-up.
        self.pump()
        if not conn.close_after:
            self._make_idle(conn)
        self._check_finished()

    def _accounted(self):
        return self.ok + self.non2xx + self.conn_errors

    def _check_finished(self):
        if self.finished is not None and not self.finished.done():
            if self.released >= self.total and self._accounted() >= self.total:
                self.finished.set_result(None)

    async def run(self):
        self.loop = asyncio.get_running_loop()
        self.finished = self.loop.create_future()
        await asyncio.gather(*(self.open_conn() for _ in range(self.nconns)))
        cpu0 = time.process_time()
        self.t0 = self.loop.time() + 0.01
        self.loop.call_at(self.t0, self._tick)
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), self.duration + self.drain + 0.01)
        except asyncio.TimeoutError:
            pass
        wall = self.loop.time() - self.t0
        self.cpu = (time.process_time() - cpu0) / wall if wall > 0 else 0.0
        self.closing = True
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0)


def reduce_timer_slack():
    """Ask Linux for 1 ns timer slack (default 50 us) so select() timeouts
    wake us on time; harmless no-op elsewhere."""
    try:
        import ctypes
        PR_SET_TIMERSLACK = 29
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, default=2000, help="requests per second (default 2000)")
    ap.add_argument("--duration", type=float, default=10, help="seconds of scheduled sends (default 10)")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections (default 8)")
    ap.add_argument("--drain", type=float, default=5, help="seconds to wait for stragglers after the last send (default 5)")
    ap.add_argument("--method", default="POST")
    ap.add_argument("--header", action="append", default=[], help="an extra request header line, repeatable")
    ap.add_argument("--body", default='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}')
    ap.add_argument("--content-type", default="application/json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.connections <= 0:
        sys.exit("openloop: rate, duration and connections must be positive")

    gen = Gen(args)
    reduce_timer_slack()
    # select() takes its timeout in microseconds, epoll in milliseconds: with
    # the default (epoll) loop every release would be up to 1 ms late. For a
    # few dozen sockets select() costs nothing extra.
    try:
        if args.connections < 500:   # select() handles fds < 1024 only
            loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
            try:
                loop.run_until_complete(gen.run())
            finally:
                loop.close()
        else:
            asyncio.run(gen.run())
    except OSError as e:
        sys.exit(f"openloop: cannot connect to {args.url}: {e}")

    lat = sorted(gen.lat)
    svc = sorted(gen.svc)
    lag = sorted(gen.gen_lag)
    unanswered = gen.total - gen._accounted()       # still pending after the drain
    # = every scheduled request that did not get a 2xx (a protocol error
    # aborts its connection, so it is already one of conn_errors).
    errors = gen.non2xx + gen.conn_errors + max(0, unanswered)
    span = max(gen.duration, gen.last_done - gen.t0) if gen.last_done else gen.duration
    rps = gen.ok / span
    us = lambda s: int(round(s * 1e6))
    fields = {
        "rps": f"{rps:.1f}",
        "p50_us": us(percentile(lat, 50)),
        "p99_us": us(percentile(lat, 99)),
        "errors": errors,
        "target_rate": f"{gen.rate:g}",
        "sent": gen.released,
        "ok": gen.ok,
        "non2xx": gen.non2xx,
        "conn_errors": gen.conn_errors,
        "protocol_errors": gen.protocol_errors,
        "unanswered": max(0, unanswered),
        "svc_p50_us": us(percentile(svc, 50)),
        "svc_p99_us": us(percentile(svc, 99)),
        "gen_lag_p50_us": us(percentile(lag, 50)),
        "gen_lag_p99_us": us(percentile(lag, 99)),
        "gen_cpu": f"{gen.cpu:.2f}",
    }
    print(
        f"openloop: {gen.ok} ok / {gen.total} scheduled at {gen.rate:g}/s over {gen.duration:g}s; "
        f"latency from schedule p50={fields['p50_us']}us p99={fields['p99_us']}us max={us(lat[-1]) if lat else 0}us; "
        f"service p50={fields['svc_p50_us']}us p99={fields['svc_p99_us']}us; "
        f"generator lag p99={fields['gen_lag_p99_us']}us cpu={fields['gen_cpu']} core; errors={errors}",
        file=sys.stderr,
    )
    if gen.cpu > 0.8:
        print("openloop: WARNING: the generator used >80% of a core; it may be the bottleneck", file=sys.stderr)
    if fields["gen_lag_p99_us"] > 500:
        print(
            f"openloop: WARNING: requests left {fields['gen_lag_p99_us']} us late at p99 (the load core was "
            "busy with something else?); latencies include that delay",
            file=sys.stderr,
        )
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
