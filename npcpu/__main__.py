import sys

from npcpu.cli import main

sys.exit(main())
