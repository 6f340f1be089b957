"""Look after the model repository: list versions, promote, canary, roll back, set the version policy.

`python model_repository.py --help`; the same as `python -m mnist_service.registry.cli`.
"""

from __future__ import annotations

import sys

from mnist_service.registry.cli import main

if __name__ == "__main__":
    sys.exit(main())
