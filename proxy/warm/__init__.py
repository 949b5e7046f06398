"""``nbia-proxy warm``: fill the cache for a cohort (a collection, a manifest, a list of series)
through a gateway, so that a client of that cohort works offline afterwards.

:mod:`proxy.warm.plan` turns a cohort into the requests a client would make (pure),
:mod:`proxy.warm.progress` renders the progress (pure), :mod:`proxy.warm.ledger` reads what the
cache keeps, :mod:`proxy.warm.runner` does the I/O, :mod:`proxy.warm.command` turns the parsed
command line into a run and an exit status (the parser is in :mod:`proxy.cli`).
"""
