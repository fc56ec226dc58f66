from ctxzip.cli import main

raise SystemExit(main())
