"""Hostile input (issue 12): each case ends in a clear error and no state change; none crashes
or wedges the daemon. Hypothesis runs are bounded (max_examples, no deadline) to stay fast."""
