"""gunicorn settings for ``make run`` and deployments: ``gunicorn -c gunicorn.conf.py run:app``."""

import multiprocessing
import os

bind = os.environ.get("TALLY_BIND", "127.0.0.1:5000")
# Requests mostly wait on the disk or Redis, so threads carry the load and
# a few processes use the cores.
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2))
worker_class = "gthread"
threads = int(os.environ.get("TALLY_THREADS", 4))
# A request holds a session lock for microseconds; 30 s means something hangs.
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = "-"
errorlog = "-"
