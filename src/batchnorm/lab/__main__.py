"""``python -m batchnorm.lab ARGS`` runs ``batchnorm lab ARGS``."""

import sys

from batchnorm.lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["lab", *sys.argv[1:]]))
