"""``python -m secure_oneshot``: the same as the ``secure-oneshot`` command."""

from .cli import entry_point

if __name__ == "__main__":
    entry_point()
