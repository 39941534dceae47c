"""``python -m torchrl_spqr.data build|list|info``: see :mod:`torchrl_spqr.data.cli`."""

import sys

from torchrl_spqr.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
