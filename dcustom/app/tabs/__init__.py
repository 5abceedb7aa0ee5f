"""One module per tab; each `build(state)` creates its components and returns the ones others wire to."""
