"""``python -m curtail`` runs the CLI (what ``ray job submit -- python -m curtail ...`` calls)."""

import sys

from curtail.cli import main

sys.exit(main())
