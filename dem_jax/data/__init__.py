"""Data: JSONL records -> token ids with loss masks -> packed or padded rows -> batches."""
