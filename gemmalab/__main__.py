import sys

from gemmalab.cli import main

sys.exit(main())
