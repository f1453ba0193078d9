"""``python -m lmcycle.cli ...`` (how torchrun starts it: ``torchrun ... -m lmcycle.cli run R.yaml``)."""

import sys

from lmcycle.cli.main import main

sys.exit(main())
