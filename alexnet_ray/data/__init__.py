"""ImageNet layouts, Parquet shards, augmentation, Ray Data pipelines, the embedded demo dataset."""
