"""TFDS builder of PolypSet (manual download); see polypset_dataset_builder.py."""
