"""``python -m tb_gradient_plugin``: the ``tb-gradient`` command line."""

import sys

from .cli import main

sys.exit(main())
