"""``python -m sparsegen.lora [flags]`` is ``sparsegen train-lora [flags]``; the form
``accelerate launch -m sparsegen.lora`` starts it in several processes."""

import sys

from ..cli.train_lora import main

sys.exit(main())
