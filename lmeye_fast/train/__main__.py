"""``python -m lmeye_fast.train --help``"""

from .cli import main

if __name__ == "__main__":
    main()
