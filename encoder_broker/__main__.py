import sys

from encoder_broker.cli import main

sys.exit(main())
