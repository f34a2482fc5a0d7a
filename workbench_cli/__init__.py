"""The command layer: the `workbench` command (`workbench train|eval|study|merge`) and its subcommands.

One module per subcommand, each with `main(argv) -> exit code` and `run()` (as a program); `launch/*.py` are
thin scripts over them for a git checkout. Imports go one way: `workbench_cli` -> `workbench_eval` ->
`workbench`, never back.
"""
