#!/usr/bin/env python3
"""The tutorial's uppercasing echo server as a program wharf runs per connection.

wharf's `process` plugin puts the connection on stdin and stdout and says who the client is
in UCSPI variables (TCPREMOTEIP, TCPREMOTEPORT, ...). stderr goes to wharf's log, never to
the client. Run it with examples/process.toml.

It answers whatever arrives at once, without waiting for a newline: the tutorial's client
sends "hello from the tutorial" with no line ending and waits for the answer. os.read
returns as soon as some bytes are there; each answer is flushed before the next read.
"""
import os
import sys

print(f"client {os.environ.get('TCPREMOTEIP')}:{os.environ.get('TCPREMOTEPORT')}", file=sys.stderr)
while True:
    data = os.read(0, 4096)
    if not data:
        break
    sys.stdout.buffer.write(data.upper())
    sys.stdout.buffer.flush()
