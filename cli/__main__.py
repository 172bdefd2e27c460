from molmoact_edge.main import main

raise SystemExit(main())
