"""Runs several tiny-recipe configs, one after another, in one torchrun launch.

Each process pays ~10 s importing megatron-core, so tests group their runs here.
Usage: python -m torch.distributed.run ... run_configs.py RECIPE '[["field=value", ...], ...]'
"""

import json
import sys

from kiln import overrides
from kiln.bootstrap import quiet_library_warnings
from kiln.recipes.pretrain import RECIPES
from kiln.training.pretrain import pretrain


def main() -> None:
    quiet_library_warnings()
    recipe = RECIPES[sys.argv[1]]
    for spec in json.loads(sys.argv[2]):
        cfg = recipe()
        overrides.apply(cfg, spec)
        pretrain(cfg)


if __name__ == "__main__":  # dist_checkpointing's save workers re-import __main__
    main()
