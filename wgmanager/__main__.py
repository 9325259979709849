import sys

from wgmanager.commands.main import main

sys.exit(main())
