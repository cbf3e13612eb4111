//! braid's worker: models, objectives, data, collectives, trainer and checkpoints.

pub mod collective;
pub mod data;
pub mod models;
pub mod objectives;
pub mod optim;
