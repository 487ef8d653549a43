"""`python -m abc_tvm.bench`: the bench, and its worker processes (`--worker JOB`)."""

import sys

from abc_tvm.bench import main

sys.exit(main())
