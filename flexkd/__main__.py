from flexkd.cli import main

raise SystemExit(main())
