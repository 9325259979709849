import sys

from wgmanager.cli import main

sys.exit(main())
