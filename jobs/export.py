"""Ray job entrypoint: consolidate a ZeRO checkpoint (any stage) into a Hugging Face model directory.

    ray job submit --working-dir . -- python jobs/export.py --checkpoint runs/demo/checkpoint-0000324 --out hf/
"""

import sys

import _path  # noqa: F401

from raypatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
