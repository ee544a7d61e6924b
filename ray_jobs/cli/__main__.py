"""``python -m ray_jobs.cli``: the ``localcl`` command."""

from __future__ import annotations

import sys

from ray_jobs.cli import main

sys.exit(main())
