"""`python -m ncl.run -n N prog args...`: the same as the ncl-run command."""
import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
