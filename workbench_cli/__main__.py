"""`python -m workbench_cli train ...`: the `workbench` command without its console script."""

from workbench_cli.main import run

run()
