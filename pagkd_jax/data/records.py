"""The row type every part of the input side shares."""

import dataclasses

MODALITIES = ("wli", "nbi")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of the dataset.

  Attributes:
    path: absolute path of the image file, or of the ArrayRecord shard holding it.
    modality: "wli" or "nbi".
    label: class index into `config.data.classes`.
    lesion_id: lesion identifier (unique across modalities unless the images are a true pair).
    patient_id: patient identifier, "" when unknown (splits then group by lesion).
    pair_id: identifier shared by a WLI and an NBI image of the same lesion, "" when unpaired.
    record_index: index of the image inside the ArrayRecord shard `path`; -1 for a plain file.
    row: 1-based row of the manifest the record came from (0 when derived from a folder), for
      error messages.
    split: the manifest's split column ("train"/"val"/"test"), "" when none; used only with
      `config.data.splits = "manifest"`.
  """

  path: str
  modality: str
  label: int
  lesion_id: str
  patient_id: str = ""
  pair_id: str = ""
  record_index: int = -1
  row: int = 0
  split: str = ""

  @property
  def group_key(self) -> str:
    """The unit that must never cross splits: the patient when known, else the lesion."""
    return f"patient:{self.patient_id}" if self.patient_id else f"lesion:{self.lesion_id}"
