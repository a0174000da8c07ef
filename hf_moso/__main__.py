"""`python -m hf_moso` runs the `hf-moso` command line."""

import sys

from .commands import main


sys.exit(main())
