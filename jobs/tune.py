"""Ray job entrypoint for a fixed-compute search: runs tuning/tune.py (arguments of `raypatch tune`).

    ray job submit --working-dir . -- python jobs/tune.py --config demo --budget 4e5 --space k-lam --name klam
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "tuning" / "tune.py"), run_name="__main__")
