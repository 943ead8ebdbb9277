"""``python -m lighten.cli ...`` — the same as the ``lighten`` script."""

import sys

from lighten.cli.main import main

sys.exit(main())
