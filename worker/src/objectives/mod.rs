//! Pretraining objectives, written once and shared by the model families.

pub mod itc;
