"""Making a loaded model fast for inference without changing what it computes: fused
projections (fuse), oneDNN-packed weights (prepare), int8/int4 weights (quant) and a compiled
decode step (compiled). The decoder itself (lmzoo.nn) knows nothing of these."""
