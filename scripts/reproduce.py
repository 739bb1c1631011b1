"""Rerun chapter 11's experiments and set dnnlab's numbers beside the book's (see dnnlab/reproduce.py)."""
from dnnlab.reproduce import main

if __name__ == "__main__":
    main()
