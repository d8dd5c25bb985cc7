"""Ray job entrypoint: raw text -> tokenized Parquet shards with Ray Data.

    ray job submit --working-dir . -- python jobs/prepare_data.py \
        --input 's3://bucket/raw/*.jsonl.gz' --tokenizer tok/ --train-tokenizer 32000 --out s3://bucket/shards/v1

Arguments are those of `raypatch prepare`; inputs and --out may be local paths or URIs (docs/cluster.md#storage).
"""

import sys

import _path  # noqa: F401

from raypatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
