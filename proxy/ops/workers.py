"""Worker processes sharing the listening port, under a small supervisor.

Used by ``run`` when ``workers`` is more than 1 (``auto``: one per core). One
Python process signs and relays on one core; the kernel spreads connections
over the workers because each has its own socket bound with SO_REUSEPORT.

The supervisor binds every socket before forking (a busy port fails at once,
with nothing started), forwards SIGTERM/SIGINT/SIGHUP to the workers, restarts
a worker that dies, and exits when all have stopped. Worker 0 also serves the
admin port. Metrics from all workers are summed through prometheus-client's
multiprocess mode; readiness and credential metrics describe worker 0, since
each worker keeps (and refreshes) its own credentials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable

log = logging.getLogger("signing_proxy.workers")

MAX_RAPID_CRASHES = 5  # a worker dying this often within a second of starting: give up
RESTART_BACKOFF = 0.5
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # forwarded to every worker


def bind_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, each with SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # later sockets join the port the first one got
            sock.listen(1024)
            sock.set_inheritable(True)
            sockets.append(sock)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def use_multiprocess_metrics() -> str:
    """Point prometheus-client at a shared directory; must run before it is imported."""
    directory = tempfile.mkdtemp(prefix="signing-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def supervise(sockets: list[socket.socket], serve: Callable[[int, socket.socket], int], ready_message: str) -> int:
    """Fork one worker per socket and keep them running until a stop signal; return the exit code.

    ``serve(index, sock)`` runs in the child and returns its exit code. ``ready_message``
    is printed once every worker has been started (the sockets already accept).
    """
    children: dict[int, int] = {}  # pid -> worker index
    started: dict[int, float] = {}
    stopping = False
    rapid_crashes = 0

    def spawn(index: int) -> None:
        # Signals wait until the child has dropped the supervisor's handlers: a stop
        # signal in between would otherwise run the supervisor's code in the child.
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
        if pid == 0:
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            for other, sock in enumerate(sockets):
                if other != index:
                    sock.close()
            code = 1
            try:
                code = serve(index, sockets[index])
            except BaseException:  # the child must never return into the supervisor's loop
                logging.getLogger("signing_proxy").exception("worker %d failed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
        started[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in SIGNALS:
        signal.signal(signum, forward)
    for index in range(len(sockets)):
        if not stopping:  # a stop signal may come before every worker is up
            spawn(index)
    print(ready_message, flush=True)
    exit_code = 0
    while children:
        pid, status = os.waitpid(-1, 0)
        index = children.pop(pid, None)
        if index is None:
            continue
        _forget_process_metrics(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            exit_code = max(exit_code, code if code > 0 else 0)
            continue
        lifetime = time.monotonic() - started.pop(pid, 0.0)
        rapid_crashes = rapid_crashes + 1 if lifetime < 1.0 else 0
        if rapid_crashes >= MAX_RAPID_CRASHES:
            log.error("worker %d keeps dying at start-up (exit %s); stopping", index, code)
            stopping = True
            exit_code = 1
            forward(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited with %s; restarting it", index, pid, code)
        time.sleep(RESTART_BACKOFF * rapid_crashes)
        spawn(index)
    for sock in sockets:
        sock.close()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and os.path.basename(directory).startswith("signing-proxy-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)
    return exit_code


def _forget_process_metrics(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the totals)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
