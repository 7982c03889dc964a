"""Generate a video with sparse attention (same options as `sparsegen generate`).

    python examples/generate.py --method radial --compare-dense --out out/radial.mp4
"""

import sys

from sparsegen.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
