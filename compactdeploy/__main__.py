"""``python -m compactdeploy``: the same command line as the ``compactdeploy`` script."""

from compactdeploy.cli import main

if __name__ == "__main__":
    main()
