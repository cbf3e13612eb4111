//! braid's coordinator: the job's membership, rendezvous, data plan and checkpoint commit.
//! It never touches libtorch; workers own the math.
//!
//! [`state::Coordinator`] is the synchronous state machine; [`service::CoordinatorService`]
//! is its tonic adapter; [`server::start`] runs it on a listener; [`client::CoordinatorClient`]
//! is the worker's side of the protocol.

pub mod client;
pub mod commit;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod journal;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod security;
pub mod server;
pub mod service;
pub mod state;
pub mod status_page;
pub mod store;
pub mod telemetry;

pub use client::CoordinatorClient;
pub use error::{Error, Result};
pub use server::{serve, start, CoordinatorHandle};
pub use state::{Coordinator, Progress};
