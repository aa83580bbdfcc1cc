"""`python -m lsd_cli`: the `lsd` command."""

import sys

from lsd_cli.main import main

sys.exit(main())
