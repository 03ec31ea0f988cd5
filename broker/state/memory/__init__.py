"""State held in this process: one broker alone."""
