import sys

from daskdp.cli import main

sys.exit(main())
