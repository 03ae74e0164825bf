"""``python -m pavlit``: the same as the ``pavlit`` command."""

from pavlit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
