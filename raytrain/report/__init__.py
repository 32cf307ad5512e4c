"""What a run shows: the console view (``console``), the report page and figure (``page``,
``plots``, ``templates/``), and the list of runs (``listing``)."""
