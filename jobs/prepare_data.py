"""Ray job entrypoint: raw text -> tokenized Parquet shards with Ray Data.

    ray job submit --working-dir . -- python jobs/prepare_data.py \
        --input '/mnt/corpus/*.jsonl.gz' --tokenizer tok/ --train-tokenizer 32000 --out /mnt/shards

Arguments are those of `raypatch prepare`.
"""

import sys

import _path  # noqa: F401

from raypatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
