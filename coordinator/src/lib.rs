//! braid's coordinator: the job's membership, rendezvous, data plan and checkpoint commit.
//! It never touches libtorch; workers own the math.

pub mod config;
pub mod error;
pub mod manifest;
pub mod plan;

pub use error::{Error, Result};
