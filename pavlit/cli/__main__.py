"""``python -m pavlit.cli``: the same as the ``pavlit`` command (and ``python -m pavlit``)."""

import sys

from pavlit.cli import main

if __name__ == "__main__":
    sys.exit(main())
