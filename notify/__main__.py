from notify.cli import main

raise SystemExit(main())
