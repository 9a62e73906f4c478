"""Reporting: every figure and Markdown table of the project, drawn from stored studies.

- :mod:`.tables`: Markdown tables (experiment grids, stage ranges, top trials).
- :mod:`.figures`: the figures of a study's coarse and fine stages.
- :mod:`.experiment_figures`: an experiment's figures and its Markdown section.
- :mod:`.gradcheck`: the gradient-check section.
- :mod:`.markdown`: the reports (one study, one experiment, ``--all``).
"""

import matplotlib

# Files, never windows: chosen once, before any module here imports pyplot.
matplotlib.use("Agg")
