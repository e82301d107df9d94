"""python -m launcher.status"""

import sys

from launcher.status import main

sys.exit(main())
