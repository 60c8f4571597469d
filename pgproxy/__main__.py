from pgproxy.cli import main

raise SystemExit(main())
