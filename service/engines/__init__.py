"""Pure torch model math: no I/O, no web. Both backends call these."""
