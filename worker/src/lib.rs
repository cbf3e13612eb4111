//! braid's worker: models, objectives, data, collectives, trainer and checkpoints.

pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod cuda_graph;
pub mod cuda_memory;
pub mod data;
pub mod deploy;
pub mod devicecheck;
pub mod eval;
pub mod export;
pub mod infer;
pub mod init_from;
pub mod models;
pub mod multi_tensor;
pub mod objectives;
pub mod optim;
pub mod profiler;
pub mod reference_export;
pub mod trainer;
pub mod worker;
