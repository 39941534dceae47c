"""``python -m torchrl_spqr.analysis RUN_DIR ...``: see :mod:`torchrl_spqr.analysis.cli`."""

from torchrl_spqr.analysis.cli import main

if __name__ == "__main__":
    main()
