"""Pure rules of the rotation service: the inventory projection, the schedule plan,
what to dispatch when work is due, and the compliance evaluation. No I/O."""
