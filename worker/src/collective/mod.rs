//! Collectives: the `Collective` trait with a TCP ring engine (CPU) and an NCCL engine (CUDA).
