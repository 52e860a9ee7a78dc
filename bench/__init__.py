"""forgetless bench."""
