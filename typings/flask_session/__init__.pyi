# Flask-Session 0.8 ships no type information.  Tally uses only flask_session.base
# (typed beside this file): its boundary with Flask-Session is typed here, once.

from flask import Flask

class Session:
    def __init__(self, app: Flask | None = None) -> None: ...
