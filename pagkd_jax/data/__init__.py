"""Input side: manifests, leakage-free splits, class-group and evaluation pipelines, synthetic data."""
