"""``python -m train.tpu_sizing ARGS``: the isolated child that ``python -m train --compile-only`` runs."""

import sys

from train.tpu_sizing import main

if __name__ == "__main__":
    sys.exit(main())
