"""gunicorn's app for tests that watch a storage fault clear: ``serve(app="quiet_spell_app:app")``.

A fault clears after ``tally.faults.QUIET_SECONDS`` (a minute) with no failure.
This module cuts it to a moment before it builds the app as ``run.py`` does,
so a test sees the cleared line in seconds, and no setting exists only for tests.
"""

from __future__ import annotations

import os

from tally import create_app, faults

#: The quiet spell after which a fault counts as cleared, in seconds.
QUIET_SECONDS = 2.0

faults.QUIET_SECONDS = QUIET_SECONDS
app = create_app(instance_path=os.environ["TALLY_INSTANCE_PATH"])
