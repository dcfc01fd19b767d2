"""The `genq` command line: the one place that wires settings into the other packages."""
