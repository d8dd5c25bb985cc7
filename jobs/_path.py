"""Make the project importable when a job runs from a `ray job submit --working-dir .` copy of the repo."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
