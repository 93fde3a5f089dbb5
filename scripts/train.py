#!/usr/bin/env python3
"""The raytorch driver script: same flags as `raytorch train`.

    python scripts/train.py                    # the seed note's job, 2 replicas, local Ray on 127.0.0.1
    python scripts/train.py --workers 3 --model mlp --dataset classification --optimizer adamw --lr 0.003
    python scripts/train.py --address auto     # on the cluster this machine belongs to
"""

import sys
from pathlib import Path

try:
    import raytorch  # noqa: F401  (installed with pip install -e .)
except ImportError:  # a checkout shipped as-is, e.g. `ray job submit --working-dir .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from raytorch.cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
