"""Ray job entrypoint: token-level (K=1) loss and perplexity of an exported model or a checkpoint.

    ray job submit --working-dir . -- python jobs/evaluate.py --model runs/demo/hf \
        --shards runs/data/default-v4096 --text /data/wikitext103-test-docs.jsonl.gz

Arguments are those of `raypatch evaluate`.
"""

import sys

import _path  # noqa: F401

from raypatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
