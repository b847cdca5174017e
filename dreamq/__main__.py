from dreamq.cli import main

raise SystemExit(main())
