"""``python -m raytrain.main``: the tutorial's entry point, kept as it was; the same as
``raytrain train`` (raytrain.commands.train).

    python -m raytrain.main --workers 4                       # embedded Ray on this machine
    python -m raytrain.main --config configs/seed.yaml        # the tutorial, exactly
    python -m raytrain.main --address auto --workers 8        # an existing Ray cluster

Exit codes: 0 done, 1 training failed, 2 bad input or unusable cluster, 130 interrupted.
"""

import sys

from raytrain.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
