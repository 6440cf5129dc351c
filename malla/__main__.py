import sys

from malla.cli import main

sys.exit(main())
