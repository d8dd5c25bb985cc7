"""Ray job entrypoint for training (patch phase, then token phase).

    ray job submit --working-dir . -- python jobs/pretrain.py --config demo --set checkpoint.name=run1

Arguments are those of `raypatch train`. Resubmitting with the same checkpoint.name and storage path resumes
the run from its last checkpoint.
"""

import sys

import _path  # noqa: F401

from raypatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
