from vldlib.cli import main

raise SystemExit(main())
