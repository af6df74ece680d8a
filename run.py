"""The entry point: ``gunicorn run:app``, ``flask --app run ...``."""

import os
from pathlib import Path

from tally import create_app

# An absolute path: with a src/ layout Flask would look in src/instance.
instance = os.environ.get("TALLY_INSTANCE_PATH") or Path(__file__).resolve().parent / "instance"
app = create_app(instance_path=str(instance))
