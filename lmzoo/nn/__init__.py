"""The decoder: one forward pass that every family runs through (model.py), its pieces
(attention, mlp, rope, masks, cache, linear), what it trains with (head_loss, recompute), and
how it generates (generate). Imports only lmzoo.config and lmzoo.errors from outside."""
