"""Input data: line-numbered JSONL readers, Grain pipelines, SFT tokenisation and packing."""
