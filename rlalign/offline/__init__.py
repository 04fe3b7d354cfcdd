"""Offline preference data: human (or model-made) preference pairs read from files instead of sampled online.

- `prefs.py`: read a Pick-a-Pic-style table (parquet or JSONL), decode and resize its image pairs, count bad rows.
  Plain functions over numpy / pyarrow / PIL, so Ray Data can call them inside `map_batches`.
- `digits_prefs.py`: a small preference set for the embedded digits model, written in the Pick-a-Pic layout
  (`rlalign data digits-prefs OUT --pairs N`).

prefs.py and digits_prefs.py never import ray; this package imports nothing on its own.
"""
