"""TFDS builder of the project's synthetic WLI/NBI dataset (pagkd_synthetic_dataset_builder.py)."""
