import sys

from tlsgate.cli import main

sys.exit(main())
