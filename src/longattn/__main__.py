from longattn.cli import main

raise SystemExit(main())
