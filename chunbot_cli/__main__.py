"""`python -m chunbot_cli` is the `chunbot` command."""

from .cli import main

main()
