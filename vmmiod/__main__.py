from vmmiod.cli import main

raise SystemExit(main())
