"""`python -m colt5_hf.cli` (what `accelerate launch -m` and torchrun run): the colt5-hf command."""

from . import main


main()
