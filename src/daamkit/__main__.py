"""``python -m daamkit ...`` is ``daamkit ...`` (what ``accelerate launch -m daamkit batch ...`` runs)."""

from daamkit.cli import main

raise SystemExit(main())
