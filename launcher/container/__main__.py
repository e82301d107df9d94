"""python -m launcher.container"""

import sys

from launcher.container import main

sys.exit(main())
