#!/usr/bin/python3
"""A real SMTP server for connwatch's tests (Debian's python3-aiosmtpd), on loopback only.

Every accepted message is written to --out as one file: a JSON line (envelope sender,
recipients, whether the session used TLS) followed by the raw message. Prints "ready"
once listening; stops when its standard input closes or after --lifetime seconds.

A server in trouble: with --refuse N (the first N messages) and/or --refuse-for T (the
first T seconds), messages are refused at the end of DATA with the --refuse-code codes in
turn (451: try again later; 421: closing the connection, which it then does) and not
stored; each refusal is a line in --out/refused.log. Afterwards every message is accepted.
"""
import argparse
import asyncio
import json
import os
import ssl
import sys
import threading
import time

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, out, reject, delay, refusal):
        self.out = out
        self.reject = set(reject)
        self.delay = delay
        self.count = 0
        self.refusal = refusal
        self.refused = 0
        self.started = time.monotonic()

    def refusing(self):
        """The code to refuse this message with, or None to accept it."""
        codes = self.refusal.codes
        within_count = self.refused < self.refusal.count
        within_time = time.monotonic() - self.started < self.refusal.seconds
        if not codes or not (within_count or within_time):
            return None
        return codes[self.refused % len(codes)]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.reject:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        code = self.refusing()
        if code is not None:
            self.refused += 1
            with open(os.path.join(self.out, "refused.log"), "a") as log:
                log.write("%d %s\n" % (code, ",".join(envelope.rcpt_tos)))
            if code == 421:
                # The answer is written before the loop runs this: then the channel closes.
                asyncio.get_running_loop().call_soon(server.transport.close)
                return "421 4.3.2 Service not available, closing transmission channel"
            return "%d 4.3.0 Try again later" % code
        self.count += 1
        name = "%d-%d.eml" % (time.time_ns(), self.count)
        meta = {"from": envelope.mail_from, "to": envelope.rcpt_tos, "tls": session.ssl is not None}
        temporary = os.path.join(self.out, "." + name)
        with open(temporary, "wb") as handle:
            handle.write(json.dumps(meta).encode() + b"\n" + envelope.original_content)
        os.rename(temporary, os.path.join(self.out, name))
        if self.delay:
            # Stored, but the answer comes late: lets a test kill the client meanwhile.
            await asyncio.sleep(self.delay)
        return "250 Message accepted"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reject", action="append", default=[])
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lifetime", type=float, default=600.0)
    parser.add_argument("--refuse", dest="count", type=int, default=0)
    parser.add_argument("--refuse-for", dest="seconds", type=float, default=0.0)
    parser.add_argument("--refuse-code", dest="codes", type=int, action="append", default=[])
    arguments = parser.parse_args()
    if (arguments.count or arguments.seconds) and not arguments.codes:
        arguments.codes = [451]
    context = None
    if arguments.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(arguments.tls_cert, arguments.tls_key)
    handler = Handler(arguments.out, arguments.reject, arguments.delay, arguments)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=arguments.port,
        tls_context=context,
        require_starttls=context is not None,
        ready_timeout=10,
    )
    controller.start()
    print("ready", flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait(arguments.lifetime)
    controller.stop()


if __name__ == "__main__":
    main()
