"""forgetless eval."""
