//! Pretraining objectives, written once and shared by the model families.

pub mod distill;
pub mod itc;
pub mod itm;
pub mod mlm;
pub mod momentum;
pub mod queue;
