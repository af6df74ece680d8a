"""gunicorn settings, used by ``make run``: ``gunicorn -c gunicorn.conf.py run:app``.

Command-line flags override these (``--workers 8``, ``--bind 0.0.0.0:8000``).
"""

import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker

bind = os.environ.get("TALLY_BIND", "127.0.0.1:5000")
# Requests mostly wait on the disk or Redis, so threads carry the load and a
# couple of processes per core use the CPU.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2))
worker_class = "gthread"
# gunicorn runs "sync" with more than one thread as gthread: with --worker-class sync,
# also pass --threads 1.  gevent ignores threads (--worker-connections instead).
threads = int(os.environ.get("TALLY_THREADS", 4))
# A session lock is held for microseconds and Redis gives up after 2 s, so a
# request still running after 30 s is stuck: restart its worker.
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = "-"
errorlog = "-"
# With the time: the access log goes to stdout, where nothing else adds one.
access_log_format = '%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms'

# Each worker keeps its metrics in files here, and /metrics sums them.  It
# must be set before the workers import prometheus_client, so here, not in
# the app; a fresh folder per run keeps a previous run's counts out.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="tally-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


# gunicorn 25.1+ serves a control socket for ``gunicornc``, and by default one
# per user: $XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl.  A second
# instance on the machine would unlink the first one's socket and take the path
# (and take it again at every worker it forks), and whichever stops first deletes
# the other's.  So each instance gets its own, in gunicorn's folder and named
# after its bind address, which no two running instances share:
#
#     gunicornc -s ~/.gunicorn/tally-127.0.0.1-5000.ctl -c "show workers"
#
# --control-socket PATH or --no-control-socket still choose otherwise.  It is set
# in on_starting, as only there is the final --bind known.


def _own_control_socket(server: Arbiter) -> None:
    settings = server.cfg.settings
    if "control_socket" not in settings:  # gunicorn before 25.1: no control socket
        return
    if server.cfg.control_socket_disable or server.cfg.control_socket != settings["control_socket"].default:
        return
    name = re.sub(r"[^A-Za-z0-9.]+", "-", " ".join(server.cfg.bind)).strip("-")
    if len(name) > 40:  # a Unix socket's path has at most 107 bytes
        name = hashlib.sha256(name.encode()).hexdigest()[:16]
    folder = os.path.dirname(settings["control_socket"].default)
    server.cfg.set("control_socket", os.path.join(folder, f"tally-{name}.ctl"))


def _refuse_bad_settings(server: Arbiter) -> None:
    """Check Tally's settings once, before any worker starts: a bad one stops gunicorn here."""
    # Left to the workers, each prints the refusal and exits, and gunicorn, reaping several at
    # once, adds a traceback of its own (HaltServer, raised again while it halts).  The check
    # runs in a child process: imported here, the app would be in every worker before gevent
    # patches what it imports.
    here = os.path.dirname(os.path.abspath(__file__))
    instance = os.environ.get("TALLY_INSTANCE_PATH") or os.path.join(here, "instance")
    check = "import sys, tally.config; tally.config.check_settings(sys.argv[1])"
    status = subprocess.run([sys.executable, "-c", check, instance], check=False).returncode
    if status:
        on_exit(server)  # gunicorn does not call it on this path
        sys.exit(status)


def on_starting(server: Arbiter) -> None:
    """Refuse bad settings, give this instance its own control socket, and start with an empty metrics folder."""
    _refuse_bad_settings(server)
    _own_control_socket(server)
    # Old metrics files would add stale counts.
    for name in os.listdir(_metrics_dir):
        path = os.path.join(_metrics_dir, name)
        if os.path.isfile(path):
            os.unlink(path)


def post_fork(server: Arbiter, worker: Worker) -> None:
    """Send Tally's own warnings (storage faults, corrupt sessions) to stderr with gunicorn's.

    Before the worker loads the app, so that what the app says as it starts
    (a Redis that would evict sessions) is logged the same way.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    log = logging.getLogger("tally")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def post_worker_init(worker: Worker) -> None:
    """Say that the worker has loaded the app."""
    # gunicorn logs "Booting worker" when it forks one; this says it has loaded the app
    # and takes requests (the tests wait for it from every worker).
    worker.log.info("Worker ready (pid: %s)", worker.pid)


def child_exit(server: Arbiter, worker: Worker) -> None:
    """Let the metrics of a dead worker stop counting as live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Arbiter) -> None:
    """Remove the metrics folder we made."""
    if "tally-metrics-" in _metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
