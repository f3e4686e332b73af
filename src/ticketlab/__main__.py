"""``python -m ticketlab`` (and ``torchrun ... -m ticketlab``): the ``ticketlab`` command."""

import sys

from .cli import main

sys.exit(main())
