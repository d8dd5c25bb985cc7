"""Ray job entrypoint for a fixed-compute search over K and λ (Ray Tune, Train V2 driver pattern).

    ray job submit --working-dir . -- python tuning/tune.py --config demo --budget 4e5 \
        --space patch.k=1,2,4 patch.lam=0.5,0.75 --name k-lam

Arguments are those of `raypatch tune`; the library code is raypatch/tune.py. Rerunning with the same
--name continues the experiment from raypatch's JSON records (never Tune's pickled state).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
