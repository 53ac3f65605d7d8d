"""`python -m sslcompress.cli`."""

from . import main

main()
