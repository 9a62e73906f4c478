"""Reporting: every figure and Markdown table of the project, drawn from stored studies.

- :mod:`.tables`: Markdown tables (experiment grids, stage ranges, top trials).
- :mod:`.figures`: the figures of a study's coarse and fine stages.
- :mod:`.experiment_figures`: an experiment's figures and its Markdown section.
- :mod:`.gradcheck`: the gradient-check section.
- :mod:`.markdown`: the reports (one study, one experiment, ``--all``).

Importing this package sets no matplotlib backend: a notebook keeps its own. The
commands, which only write files, call :func:`files_only` first.
"""


def files_only() -> None:
    """Draw into files, never windows (the Agg backend): for the commands' mains."""
    import matplotlib

    matplotlib.use("Agg")
