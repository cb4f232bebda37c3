"""`python -m proxy` runs the command line."""

from proxy.cli.main import main

raise SystemExit(main())
