"""Tiny-scale reproductions and readings of run results: the BOSE paper's claims (`stability.py`, `consistency.py`:
their training runs are studies trained by `workbench.study`'s runner, their sweeps `workbench_eval.sweep.sweep_all`,
their summaries `workbench.stats`), EES against the exact EigenScore (`ees_agreement.py`) and the LoRA update's early
growth per arm of a study (`update_growth.py`)."""
