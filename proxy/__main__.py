"""``python -m proxy`` runs the ``nbia-proxy`` command."""

from proxy.cli import main

raise SystemExit(main())
