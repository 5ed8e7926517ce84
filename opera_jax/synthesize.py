"""Command-line entry of cold-start synthesis (OPERA method §4); see opera_jax/synth/.

    python -m opera_jax.synthesize --config=configs/synth_tiny.py [--config.synth.seed=1 …]

Prints the summary as JSON at the end; the records are in `config.output`.
"""

from __future__ import annotations

import json
import logging

from opera_jax.synth.stage import synthesize

__all__ = ["synthesize"]


def main(config) -> None:
    logging.getLogger("opera_jax").setLevel(logging.INFO)
    print(json.dumps(synthesize(config), indent=2))


if __name__ == "__main__":
    from opera_jax.train.cli import run

    run(main)
