"""`python -m cli …` runs the `genq` command (what `genq up` uses to start its children)."""

from cli.main import main

main(prog_name="genq")
