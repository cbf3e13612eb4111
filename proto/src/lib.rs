//! Generated types and services for the braid coordinator protocol (`proto/braid.proto`).

#![allow(clippy::all)]

/// Version of the wire protocol; a worker and coordinator with different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 1;

/// The `braid.v1` package.
pub mod v1 {
    tonic::include_proto!("braid.v1");
}

pub use v1::*;
