"""``python -m train``: see ``python -m train --help``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from train.config import parse_config

    cfg = parse_config(argv)
    from resnet_flax.io import WeightsError
    from train.errors import DataError, NonFiniteLoss, RunError
    from train.loop import run

    try:
        run(cfg)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataError, RunError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # grain's worker processes are spawned: keep the entry point guarded
    sys.exit(main())
