"""Small deterministic tasks that ship with lmzoo, for the demo and the method comparison."""
