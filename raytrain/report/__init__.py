"""What a run shows: the console view (``console``), a run directory read for showing
(``rundir``), the report page and figure (``page``, ``plots``, ``templates/``, a sweep's page
too), and the list of runs (``listing``).

May import the shared top-level modules only.
"""
