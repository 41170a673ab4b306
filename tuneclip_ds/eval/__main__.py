import sys

from tuneclip_ds.eval.cli import main

sys.exit(main())
