"""``python -m deploy_cli``: the ``deploy`` command where the console script is not on PATH."""

import sys

from ._main import main

sys.exit(main())
