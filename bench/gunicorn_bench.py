"""The same gunicorn settings for every system measured: no access log, as the stock recipe has none.

The harness passes the worker class (and threads or worker connections) on the command line.
"""

worker_class = "gthread"
accesslog = None
loglevel = "warning"
# Each gunicorn would take over the user's default control socket (gunicorn 25.1+; older ones ignore the name).
control_socket_disable = True
