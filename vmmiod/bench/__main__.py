from vmmiod.bench import main

raise SystemExit(main())
