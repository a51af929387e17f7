from fedpeft.cli import main

raise SystemExit(main())
