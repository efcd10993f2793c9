"""``python -m oteacheck_lightning``: the same as the ``oteacheck`` command."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
