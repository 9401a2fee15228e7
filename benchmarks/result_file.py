"""Where every benchmark's JSON result goes (no JAX import: the input-pipeline benchmark runs without it)."""

import json
import pathlib


def write(path: str, result: dict) -> None:
  """Writes `result` as indented JSON to `path` (creating its folder) and says where."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")
