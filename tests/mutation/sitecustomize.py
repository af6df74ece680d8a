"""``make mutants``: make the mutants reach, and be traced in, the processes that tests start.

mutmut 3 mutates a copy of ``src/`` (``mutants/src``) and puts it first on
``sys.path`` of its own process only.  Many tests start gunicorn, whose workers
import ``tally`` afresh: through the editable install they would run the
original code, and every mutant would survive those tests.  So the first
interpreter that loads this module (mutmut itself) puts the copy on the
``PYTHONPATH`` that every later one inherits.

mutmut also decides which tests to run against a mutant by recording, while
the clean suite runs, which functions each test calls.  A call made in a
gunicorn worker is recorded in that worker's memory and lost, and a test that
reaches a function only through gunicorn would never be run against its
mutants.  So a later interpreter that runs while mutmut records appends each
function it calls to a file of its own in ``TALLY_MUTANTS_HITS``, which the
pytest plugin :mod:`subprocess_hits` adds to the calling test.

The Makefile puts this folder on ``PYTHONPATH`` for ``mutmut run`` only.
"""

from __future__ import annotations

import os
from pathlib import Path

_ROOT = "TALLY_MUTANTS_ROOT"
#: The folder of the hit files, one per process.
HITS = "TALLY_MUTANTS_HITS"


def _first_interpreter() -> None:
    """In mutmut's own process: point every process it starts at the mutated copy."""
    root = Path.cwd()
    os.environ[_ROOT] = str(root)
    os.environ[HITS] = str(root / "mutants" / "subprocess-hits")
    copy = root / "mutants" / "src"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))


def _record_hits_to_file() -> None:
    """In a process that a test started while mutmut records: send each traced call to the hits folder."""
    from mutmut.mutation import trampoline

    folder = Path(os.environ[HITS])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.txt"
    seen: set[str] = set()

    def record(name: str, caller: str | None = None) -> None:
        if name not in seen:
            seen.add(name)
            # One short append per new name: a worker killed with SIGKILL has sent what it called.
            with path.open("a") as f:
                f.write(name + "\n")

    # mutmut 3.8's trampoline calls this name, bound in its own module; a
    # version without it must fail loudly here, not leave the mutants untested.
    assert hasattr(trampoline, "record_trampoline_hit"), "mutmut changed: see tests/mutation/sitecustomize.py"
    trampoline.record_trampoline_hit = record


if _ROOT not in os.environ:
    _first_interpreter()
elif os.environ.get("MUTANT_UNDER_TEST") == "stats":
    _record_hits_to_file()
