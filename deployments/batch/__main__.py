import sys

from deployments.batch.cli import main

sys.exit(main())
