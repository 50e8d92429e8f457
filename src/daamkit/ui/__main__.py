"""``python -m daamkit.ui [--model PATH] [--host H] [--port P]``: same as ``daamkit ui``."""

from daamkit.ui import main

raise SystemExit(main())
