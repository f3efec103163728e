"""``python -m vtoolkit ...`` (and ``accelerate launch -m vtoolkit eval ...``): the ``vtoolkit`` command line."""
from vtoolkit.cli import main

if __name__ == "__main__":
    main()
