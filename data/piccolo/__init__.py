"""TFDS builder of PICCOLO (manual download); see piccolo_dataset_builder.py."""
