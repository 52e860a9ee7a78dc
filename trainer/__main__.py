"""``python -m trainer`` is ``python -m trainer.run``."""
import sys

from trainer.run import main

sys.exit(main())
