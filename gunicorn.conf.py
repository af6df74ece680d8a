"""gunicorn settings, used by ``make run``: ``gunicorn -c gunicorn.conf.py run:app``.

Command-line flags override these (``--workers 8``, ``--bind 0.0.0.0:8000``).
"""

import logging
import multiprocessing
import os
import shutil
import sys
import tempfile

bind = os.environ.get("TALLY_BIND", "127.0.0.1:5000")
# Requests mostly wait on the disk or Redis, so threads carry the load and a
# couple of processes per core use the CPU.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2))
worker_class = "gthread"
threads = int(os.environ.get("TALLY_THREADS", 4))
# A session lock is held for microseconds and Redis gives up after 2 s, so a
# request still running after 30 s is stuck: restart its worker.
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'

# Each worker keeps its metrics in files here, and /metrics sums them.  It
# must be set before the workers import prometheus_client, so here, not in
# the app; a fresh folder per run keeps a previous run's counts out.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="tally-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def on_starting(server):
    """Start with an empty metrics folder: old files would add stale counts."""
    for name in os.listdir(_metrics_dir):
        path = os.path.join(_metrics_dir, name)
        if os.path.isfile(path):
            os.unlink(path)


def post_worker_init(worker):
    """Send Tally's own warnings (storage faults, corrupt sessions) to stderr with gunicorn's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    log = logging.getLogger("tally")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def child_exit(server, worker):
    """Let the metrics of a dead worker stop counting as live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics folder we made."""
    if "tally-metrics-" in _metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
