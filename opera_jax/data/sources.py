"""One reader for every data source a stage names in `data.path` (and the like).

    rows = open_rows("/data/sft.jsonl", required=SFT_FIELDS)       # JSONL (globs, commas)
    rows = open_rows("/data/rl.parquet", required=PROMPT_FIELDS)   # Parquet (verl schema too)
    rows = open_rows("/data/rl.array_record")                       # ArrayRecord, random access
    rows = open_rows("hf:/data/saved_dataset:train")                # HF datasets on disk
    rows = open_rows("tfds:my_prompts/v1:train", tfds_data_dir=…)   # TFDS, local data_dir
    rows = open_rows("toy:prompts:256", seed=0)                      # the embedded toy domain

The scheme (`hf:`, `tfds:`, `toy:`) or else each file's suffix picks the reader: `.parquet`
(data/tables.py), `.array_record` (data/records.py), anything else JSONL (data/jsonl.py);
files of a spec are read in order and concatenated (ArrayRecord files only with their own
kind). Every reader maps the published forms (verl, chat messages) onto the one row schema and
validates the rows (data/schema.py): errors name the file, the row and the field.

The toy domain (data/toy_domain.py) is a source like any other, generated in memory:
`toy:<kind>:<count>[:<seed offset>]` with kind

    sft      SFT rows (prompt, thinking, output, reference, task_type, id)
    prompts  prompt rows (id, prompt, reference, task_type) from the training triples
    heldout  prompt rows from the held-out triples (validation, evaluation)

drawn with seed = the reading stage's `data.seed` + the offset (0 when omitted), so a
`--config.data.seed=…` run sees other toy rows, and two kinds can be kept apart by offsets.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from opera_jax.config.sections import OnBadRow
from opera_jax.data import tables, toy_domain
from opera_jax.data.records import open_files

TOY_SCHEME = "toy:"
TOY_KINDS = ("sft", "prompts", "heldout")


@dataclasses.dataclass(frozen=True)
class ToySpec:
    kind: str
    count: int
    seed_offset: int = 0


def parse_toy(spec: str) -> ToySpec:
    """`toy:<kind>:<count>[:<seed offset>]` → ToySpec; ValueError naming what is wrong."""
    parts = spec[len(TOY_SCHEME):].split(":")
    usage = f"toy data spec {spec!r}: expected toy:<kind>:<count>[:<seed offset>] with kind " \
            f"in {', '.join(TOY_KINDS)}"
    if len(parts) not in (2, 3) or parts[0] not in TOY_KINDS:
        raise ValueError(usage)
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(usage) from None
    if numbers[0] < 1:
        raise ValueError(f"{usage}; the count must be >= 1")
    return ToySpec(parts[0], *numbers)


def toy_rows(spec: ToySpec, *, seed: int) -> list[dict]:
    seed = seed + spec.seed_offset
    if spec.kind == "sft":
        return toy_domain.examples(spec.count, seed=seed)
    return toy_domain.prompt_rows(spec.count, seed=seed, held_out=spec.kind == "heldout")


def is_toy(spec: str) -> bool:
    return spec.startswith(TOY_SCHEME)


def open_rows(spec: str, *, required: Sequence[str] = (), on_bad_row: OnBadRow | str = "raise",
              seed: int = 0, tfds_data_dir: str | None = None) -> Sequence[dict]:
    """The rows `spec` names (see the module docstring), validated.

    Args:
      spec: a toy, `hf:` or `tfds:` spec, or files (comma-separated paths and/or globs).
      required: fields each row must hold as non-empty strings.
      on_bad_row: `raise` at the first bad row (naming file and row) or `skip` it (counted).
      seed: the reading stage's data seed (toy rows only).
      tfds_data_dir: where `tfds:` datasets are prepared (None: $TFDS_DATA_DIR).
    """
    if is_toy(spec):
        return toy_rows(parse_toy(spec), seed=seed)
    if spec.startswith(tables.HF_SCHEME):
        return tables.read_hf(spec, required=required, on_error=on_bad_row)
    if spec.startswith(tables.TFDS_SCHEME):
        return tables.read_tfds(spec, data_dir=tfds_data_dir, required=required,
                                on_error=on_bad_row)
    return open_files(spec, required=required, on_error=on_bad_row)
