"""``python -m qtasks``: the same CLI as the ``qtasks`` script."""

from qtasks.cli import main

if __name__ == "__main__":
    main()
