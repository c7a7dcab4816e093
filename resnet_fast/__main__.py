import sys

from resnet_fast.report import main

sys.exit(main())
