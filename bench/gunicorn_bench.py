"""The same gunicorn settings for every system measured: no access log, as the stock recipe has none."""

worker_class = "gthread"
accesslog = None
loglevel = "warning"
