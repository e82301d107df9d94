"""python -m launcher.container"""

import sys

from launcher.container.cli import main

sys.exit(main())
