"""Development tooling for the demo, the tests and the benchmarks; not part of the installed packages."""
