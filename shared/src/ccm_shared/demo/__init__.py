"""``ccm demo``: a month of a synthetic practice pushed through the running platform over HTTP.

``generate`` builds the practice (pure, seeded), ``runner`` drives the services' HTTP APIs,
``report`` writes the output folder and the summary. Nothing here imports a service package.
"""
