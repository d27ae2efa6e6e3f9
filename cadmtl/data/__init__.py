"""Data wing: CAD 100K Parquet repos as tensors for training and evaluation (the builder is dataset_scripts)."""
