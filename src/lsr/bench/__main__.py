import sys

from lsr.bench.cli import main

sys.exit(main())
