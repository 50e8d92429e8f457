"""``python -m daamkit.world.train ARGS`` is ``daamkit world train ARGS``."""

import sys

from daamkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["world", "train", *sys.argv[1:]]))
