"""Long-running entry points: the process that serves every deployment with its triggers, and the git
webhook receiver that turns a signed push into the Prefect event those triggers listen for."""
