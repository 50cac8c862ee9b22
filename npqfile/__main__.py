import sys

from npqfile.cli import main

sys.exit(main())
