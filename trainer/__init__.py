"""forgetless trainer."""
