"""PICCOLO (3 classes, WLI and NBI colonoscopy frames) as a TFDS dataset, from a manual download.

  tfds build data/piccolo --manual_dir /data/piccolo --data_dir ~/tensorflow_datasets

See data/README.md; the layout of the manual folder is in MANUAL_DOWNLOAD_INSTRUCTIONS.
"""

import endoscopy_builder  # data/ is on sys.path under `tfds build data/piccolo`.


class Builder(endoscopy_builder.EndoscopyBuilder):
  """PICCOLO white-light and narrow-band colonoscopy images, labelled by histology."""

  CLASSES = ("hyperplasia", "adenoma", "adenocarcinoma")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
PICCOLO is not downloadable: its owners grant access on request (see the PICCOLO publication,
Sanchez-Peralta et al., Applied Sciences 2020, for how to ask). Once you have it, use its
per-frame metadata (histology and light mode) to select the frames of the three classes
hyperplasia, adenoma, adenocarcinoma, in white light (wli) and narrow-band imaging (nbi).
Use one lesion_id per polyp (and its patient when known), so no lesion crosses folds.
""" + endoscopy_builder.LAYOUT_INSTRUCTIONS
