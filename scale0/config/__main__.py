"""`python -m scale0.config --markdown` prints the settings tables."""

from __future__ import annotations

import sys

from scale0.config.markdown import main

sys.exit(main())
