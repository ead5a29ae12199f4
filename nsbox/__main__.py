"""`python -m nsbox` runs the CLI."""

from nsbox.cli import main

main()
