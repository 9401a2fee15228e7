"""PolypSet (2 classes, WLI and NBI colonoscopy frames) as a TFDS dataset, from a manual download.

  tfds build data/polypset --manual_dir /data/polypset --data_dir ~/tensorflow_datasets

See data/README.md; the layout of the manual folder is in MANUAL_DOWNLOAD_INSTRUCTIONS.
"""

import endoscopy_builder  # data/ is on sys.path under `tfds build data/polypset`.


class Builder(endoscopy_builder.EndoscopyBuilder):
  """PolypSet white-light and narrow-band colonoscopy images: hyperplastic vs adenomatous."""

  CLASSES = ("hyperplastic", "adenomatous")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
PolypSet is not downloaded by this builder: obtain it from its distributors (access may need a
request or registration). Select the white-light (wli) and narrow-band (nbi) frames of the two
classes hyperplastic and adenomatous, and give every frame the id of its polyp (lesion_id), so no
lesion crosses folds.
""" + endoscopy_builder.LAYOUT_INSTRUCTIONS
